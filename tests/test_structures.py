"""Each structure's solve against a dense float64 Fisher (ALGORITHMS.md §2, §3.1, §3.2).

One step with lr = 1, no momentum, gives update = −d, which is compared with a dense
computation from the batch statistics (the Fisher formed explicitly, then np.linalg.solve).
"""

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from tests import cases
from tests.helpers import mlp_layers, rel_err

MLP_SHAPE = (4, 5, 3)


@pytest.fixture
def problem():
    rs = np.random.default_rng(1)
    mlp = MLP(MLP_SHAPE, activation="tanh", loss="softmax_ce")
    x = rs.normal(size=(6, 4))
    y = np.eye(3)[rs.integers(0, 3, 6)]
    params = mlp.init(seed=3)
    return mlp, params, x, y


def flat(leaves):
    return np.concatenate([np.ravel(v) for v in leaves])


def one_step(backend, opt, mlp, params, x, y):
    p = backend.tree(params)
    xb, yb = backend.asarray(x), backend.asarray(y)
    state = opt.init(p, layers=mlp_layers(mlp))
    upd, state = opt.update(mlp.grad(p, xb, yb), state, p, stats=mlp.stats(p, xb, yb, kind="both"),
                            oracle=mlp.oracle(xb, yb), curvature=True, inverse=True)
    return [-u for u in backend.tree_numpy(upd)], state


def dense_fisher(mlp, params, x, y):
    b = mlp.batch(params, x, y, per_example=True)
    J = np.concatenate([np.reshape(j, (x.shape[0], -1)) for j in b.per_example_grads], axis=1)
    return J.T @ J / x.shape[0], flat(b.grads)


def test_woodbury_equals_dense_solve(backend, problem):
    mlp, params, x, y = problem
    lam = 1e-2
    d, _ = one_step(backend, cases.build("reng/woodbury/double_bp", lr=1.0, rho=0.0, damping=lam),
                    mlp, params, x, y)
    F, g = dense_fisher(mlp, params, x, y)
    assert rel_err(flat(d), np.linalg.solve(F + lam * np.eye(len(g)), g)) < 1e-10


def test_ring_direction_equals_regularized_dense_solve(backend, problem):
    mlp, params, x, y = problem
    lam, rho = 1e-2, 0.5
    d, _ = one_step(backend, cases.build("ring/woodbury/-", lr=1.0, rho=rho, damping=lam),
                    mlp, params, x, y)
    F, g = dense_fisher(mlp, params, x, y)
    expected = np.linalg.solve(F + lam * np.eye(len(g)), g + rho * F @ g)
    assert rel_err(flat(d), expected) < 1e-10


def test_reng_double_backprop_solves_the_gr_gradient(backend, problem):
    mlp, params, x, y = problem
    lam, rho = 1e-2, 0.3
    d, _ = one_step(backend, cases.build("reng/woodbury/double_bp", lr=1.0, rho=rho, damping=lam),
                    mlp, params, x, y)
    F, g = dense_fisher(mlp, params, x, y)
    Hg = flat(mlp.hvp(params, x, y, mlp.grad(params, x, y)))
    expected = np.linalg.solve(F + lam * np.eye(len(g)), g + rho * Hg)
    assert rel_err(flat(d), expected) < 1e-10


def test_diagonal_first_step(backend, problem):
    mlp, params, x, y = problem
    lam = 1e-3
    d, _ = one_step(backend, cases.build("reng/diagonal/double_bp", lr=1.0, rho=0.0, damping=lam),
                    mlp, params, x, y)
    b = mlp.batch(params, x, y, per_example=True)
    q = [np.mean(j * j, axis=0) for j in b.per_example_grads]  # bias-corrected EMA at t = 1
    assert rel_err(flat(d), flat([g / (qi + lam) for g, qi in zip(b.grads, q)])) < 1e-12


@pytest.mark.parametrize("method", ["newton_schulz", "cholesky"])
def test_kfac_equals_kronecker_inverse(backend, problem, method):
    mlp, params, x, y = problem
    lam = 1e-2
    opt = cases.build("reng/kfac/double_bp", lr=1.0, rho=0.0, damping=lam, ns_tol=1e-13,
                      ns_max_iter=100, inverse_method=method)
    d, _ = one_step(backend, opt, mlp, params, x, y)
    b = mlp.batch(params, x, y, layer_stats=True)
    for k, ls in enumerate(b.layers):
        a = np.concatenate([ls.inputs, np.ones((x.shape[0], 1))], axis=1)
        s = ls.output_grads
        A, S = a.T @ a / len(a), s.T @ s / len(s)
        pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(S) / S.shape[0]))
        A_l = A + pi * np.sqrt(lam) * np.eye(len(A))
        S_l = S + np.sqrt(lam) / pi * np.eye(len(S))
        G = np.concatenate([b.grads[2 * k], b.grads[2 * k + 1][:, None]], axis=1)
        # vec column-major: vec(S⁻¹ G A⁻¹) = (A ⊗ S)⁻¹ vec(G)
        vec = np.linalg.solve(np.kron(A_l, S_l), G.flatten(order="F"))
        U = vec.reshape(G.shape, order="F")
        assert rel_err(d[2 * k], U[:, :-1]) < 1e-9
        assert rel_err(d[2 * k + 1], U[:, -1]) < 1e-9


def test_kfac_transposed_and_dict_params(numpy_backend, problem):
    """JAX/Flax layout (d_in, d_out) with dict keys gives the transposed torch-layout result."""
    mlp, params, x, y = problem
    opt = cases.build("reng/kfac/double_bp", lr=1.0, rho=0.0, damping=1e-2, ns_tol=1e-13)
    d_ref, _ = one_step(numpy_backend, opt, mlp, params, x, y)
    st = mlp.stats(params, x, y, kind="layers")
    grads = mlp.grad(params, x, y)
    names = ["w0", "b0", "w1", "b1"]
    tp = {n: (v.T if n[0] == "w" else v) for n, v in zip(names, params)}
    tg = {n: (v.T if n[0] == "w" else v) for n, v in zip(names, grads)}
    layers = [gc.LayerStats(f"w{k}", f"b{k}", ls.inputs, ls.output_grads, transposed=True)
              for k, ls in enumerate(st.layers)]
    state = opt.init(tp, layers=[gc.LayerSpec(f"w{k}", f"b{k}", True) for k in range(2)])
    upd, _ = opt.update(tg, state, tp, stats=gc.Stats(layers=layers), curvature=True,
                        inverse=True)
    for n, ref in zip(names, d_ref):
        got = -upd[n].T if n[0] == "w" else -upd[n]
        assert rel_err(got, ref) < 1e-12


def test_kfac_ema_and_refresh_schedule(numpy_backend, problem):
    """Factors refresh on curvature steps only; the first update takes the batch (§2.1)."""
    mlp, params, x, y = problem
    beta = 0.9
    opt = cases.build("reng/kfac/double_bp", lr=0.0, rho=0.0, damping=1e-2, ema_decay=beta,
                      curvature_every=2, inverse_every=4)
    assert [opt.flags(t - 1) for t in (1, 2, 3, 5)] == [
        (True, True), (False, False), (True, False), (True, True)]
    state = opt.init(params, layers=mlp_layers(mlp))
    x2 = x[::-1] * 2.0
    seen = []
    for t, xb in zip((1, 2, 3), (x, x2, x2)):
        cur, inv = opt.flags(t - 1)
        st = mlp.stats(params, xb, y, kind="layers") if cur else None
        _, state = opt.update(mlp.grad(params, xb, y), state, params, stats=st, curvature=cur,
                              inverse=inv)
        seen.append(state.curvature.kfac[0].A)
    a1 = np.concatenate([x, np.ones((6, 1))], axis=1)
    a2 = np.concatenate([x2, np.ones((6, 1))], axis=1)
    A1, A2 = a1.T @ a1 / 6, a2.T @ a2 / 6
    assert rel_err(seen[0], A1) < 1e-14
    assert np.array_equal(seen[1], seen[0])
    assert rel_err(seen[2], beta * A1 + (1 - beta) * A2) < 1e-14
    assert int(state.curvature_count) == 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pi_split_formula_and_clamps(dtype):
    """π = √((tr A/d_A)/(tr S/d_S)) (§2.1), clamped to [1e-4, 1e4]; tr S = 0 gives 1e4."""
    from grng_core.structures.kfac import PI_MAX, PI_MIN, pi_split

    def pi(ta, da, ts, ds):
        return float(pi_split(np.asarray(ta, dtype=dtype), da, np.asarray(ts, dtype=dtype),
                              ds, np))

    assert pi(6.0, 3, 8.0, 2) == pytest.approx(np.sqrt((6 / 3) / (8 / 2)), rel=1e-6)
    clamp = dict(rel=1e-6)  # the clamps in the dtype
    assert pi(1e12, 1, 1.0, 1) == pytest.approx(PI_MAX, **clamp)
    assert pi(1e-12, 1, 1.0, 1) == pytest.approx(PI_MIN, **clamp)
    assert pi(1.0, 4, 0.0, 2) == pytest.approx(PI_MAX, **clamp)
    assert np.isfinite(pi(0.0, 4, 0.0, 2))  # A = S = 0: A_λ ⊗ S_λ = λI for any π
