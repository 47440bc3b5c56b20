"""RING's two forms against dense float64 references (ALGORITHMS.md §3.2).

form="adaptive_damping": d = (F + c_t I)⁻¹ g, c_t = λ + ρ‖g‖², checked at the first step and
at a later step that refreshes nothing while ‖g‖ has changed (an inverse that is only right on
refresh steps fails there); every backend agrees over 20 steps, also under jit with in-graph
flags and one compile. form="gauss_newton" is the earlier RING (the table's "ring/*/-" rows).
"""

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from tests.backends import BACKEND_NAMES, get_backend
from tests.helpers import mlp_layers, rel_err

NO_CLIP = dict(kl_clip=None)  # single steps against references without the §3 trust region

LAM, RHO = 1e-2, 0.7


@pytest.fixture
def problem():
    rs = np.random.default_rng(11)
    mlp = MLP((4, 5, 3), activation="tanh", loss="softmax_ce")
    batches = [(rs.normal(size=(6, 4)), np.eye(3)[rs.integers(0, 3, 6)]) for _ in range(3)]
    return mlp, mlp.init(seed=3), batches


def flat(leaves):
    return np.concatenate([np.ravel(v) for v in leaves])


def _c(g):
    return LAM + RHO * float(flat(g) @ flat(g))


def _steps(backend, opt, mlp, params, batches, flags):
    """Directions d (lr = 1: update = −d) of the steps given (curvature, inverse) flags."""
    p = backend.tree(params)
    state = opt.init(p, layers=mlp_layers(mlp))
    out = []
    for (x, y), (cur, inv) in zip(batches, flags):
        xb, yb = backend.asarray(x), backend.asarray(y)
        st = mlp.stats(p, xb, yb, kind="both") if cur else None
        upd, state = opt.update(mlp.grad(p, xb, yb), state, p, stats=st, curvature=cur,
                                inverse=inv)
        out.append([-u for u in backend.tree_numpy(upd)])
    return out


def _kfac_reference(mlp, params, x, y, g, factors):
    """U = (S + (√c/π)I)⁻¹ G (A + π√c I)⁻¹ per layer with the given undamped factors."""
    c = _c(g)
    out = []
    for k, (A, S) in enumerate(factors):
        pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(S) / len(S)))
        G = np.concatenate([g[2 * k], g[2 * k + 1][:, None]], axis=1)
        U = np.linalg.solve(S + np.sqrt(c) / pi * np.eye(len(S)), G)
        U = np.linalg.solve(A + pi * np.sqrt(c) * np.eye(len(A)), U.T).T
        out += [U[:, :-1], U[:, -1]]
    return out


@pytest.mark.parametrize("method", ["eigh", "cholesky", "newton_schulz"])
def test_kfac_adaptive_damping_every_step(backend, problem, method):
    mlp, params, batches = problem
    opt = gc.ring(**NO_CLIP, lr=1.0, rho=RHO, damping=LAM, structure="kfac", ns_tol=1e-13,
                  ns_max_iter=100, inverse_method=method, curvature_every=2, inverse_every=2)
    flags = [(True, True), (False, False)]
    d = _steps(backend, opt, mlp, params, batches, flags)
    (x1, y1), (x2, y2) = batches[:2]
    factors = []
    for ls in mlp.batch(params, x1, y1, layer_stats=True).layers:
        a = np.concatenate([ls.inputs, np.ones((len(ls.inputs), 1))], axis=1)
        factors.append((a.T @ a / len(a), ls.output_grads.T @ ls.output_grads / len(a)))
    g1, g2 = mlp.grad(params, x1, y1), mlp.grad(params, x2, y2)
    assert abs(_c(g1) - _c(g2)) > 0.1 * _c(g1)  # the damping moved between the steps
    for got, g in zip(d, (g1, g2)):  # step 2 refreshes nothing: the factors of step 1
        assert rel_err(flat(got), flat(_kfac_reference(mlp, params, None, None, g,
                                                         factors))) < 1e-9


def test_woodbury_adaptive_damping(backend, problem):
    mlp, params, batches = problem
    opt = gc.ring(**NO_CLIP, lr=1.0, rho=RHO, damping=LAM, structure="woodbury")
    d = _steps(backend, opt, mlp, params, batches, [(True, True)] * 2)
    for got, (x, y) in zip(d, batches):
        b = mlp.batch(params, x, y, per_example=True)
        J = np.concatenate([np.reshape(j, (len(x), -1)) for j in b.per_example_grads], axis=1)
        F, g = J.T @ J / len(x), flat(b.grads)
        expected = np.linalg.solve(F + _c(b.grads) * np.eye(len(g)), g)
        assert rel_err(flat(got), expected) < 1e-10


def test_diagonal_adaptive_damping(backend, problem):
    mlp, params, batches = problem
    opt = gc.ring(**NO_CLIP, lr=1.0, rho=RHO, damping=LAM, structure="diagonal", curvature_every=2)
    d = _steps(backend, opt, mlp, params, batches, [(True, True), (False, False)])
    x1, y1 = batches[0]
    q = [np.mean(j * j, axis=0) for j in mlp.batch(params, x1, y1, per_example=True)
         .per_example_grads]  # bias-corrected EMA after one update
    for got, (x, y) in zip(d, batches):
        g = mlp.grad(params, x, y)
        assert rel_err(flat(got), flat([gi / (qi + _c(g)) for gi, qi in zip(g, q)])) < 1e-12


def test_rho_zero_is_ngd(backend, problem):
    mlp, params, batches = problem
    flags = [(True, True)] * 2
    ring = _steps(backend, gc.ring(**NO_CLIP, lr=1.0, rho=0.0, damping=LAM), mlp, params,
                  batches, flags)
    ngd = _steps(backend, gc.reng(**NO_CLIP, lr=1.0, rho=0.0, damping=LAM), mlp, params,
                 batches, flags)
    for a, b in zip(ring, ngd):
        assert rel_err(flat(a), flat(b)) < 1e-13


def _train(backend_name, structure, steps=20, jit=False):
    be = get_backend(backend_name)
    mlp = MLP((4, 5, 3), activation="tanh", loss="softmax_ce")
    opt = gc.ring(**NO_CLIP, lr=0.5, rho=RHO, damping=LAM, structure=structure, momentum=0.5,
                  curvature_every=2, inverse_every=3, refresh_warmup=0)
    rs = np.random.default_rng(5)
    p = be.tree(mlp.init(seed=1))
    state = opt.init(p, layers=mlp_layers(mlp) if structure == "kfac" else None)

    def step(p, state, x, y):
        upd, state = opt.update(mlp.grad(p, x, y), state, p, stats=mlp.stats(p, x, y,
                                                                                kind="both"))
        return gc.apply_updates(p, upd), state

    if jit:
        import jax

        step = jax.jit(step)
    compiled = None
    for t in range(steps):
        x, y = rs.normal(size=(6, 4)), np.eye(3)[rs.integers(0, 3, 6)]
        p, state = step(p, state, be.asarray(x), be.asarray(y))
        if jit and t == 1:
            compiled = step._cache_size()
    if jit:  # in-graph refresh flags: no compile after the first steps
        assert step._cache_size() == compiled
    return flat(be.tree_numpy(p)), step


@pytest.mark.parametrize("structure", ["kfac", "diagonal", "woodbury"])
def test_every_backend_agrees_over_20_steps(structure):
    ref, _ = _train("numpy", structure)
    for name in BACKEND_NAMES:
        got, _ = _train(name, structure)
        assert rel_err(got, ref) < 1e-10, name
    if "jax" in BACKEND_NAMES:
        got, _ = _train("jax", structure, jit=True)
        assert rel_err(got, ref) < 1e-10


def test_rho_schedule_equals_the_constant(numpy_backend, problem):
    """ρ may be a schedule (§3.2): ρ(t) = 0.7 gives the constant's steps exactly."""
    mlp, params, batches = problem
    flags = [(True, True), (False, False)]
    const = _steps(numpy_backend, gc.ring(**NO_CLIP, lr=1.0, rho=RHO, damping=LAM), mlp,
                   params, batches, flags)
    sched = _steps(numpy_backend, gc.ring(**NO_CLIP, lr=1.0, rho=lambda t: RHO + 0.0 * t,
                                          damping=LAM), mlp, params, batches, flags)
    for a, b in zip(const, sched):
        assert rel_err(flat(a), flat(b)) < 1e-15
