"""The finite-difference ĝ in factored form (ALGORITHMS.md §1, §2.1).

ĝ = Σ cᵢ gᵢ over the batch's own pass and the shifted ones; where the oracle gives each
pass's K-FAC rows (`Oracle.grad_rows_fn`), S⁻¹ĝA⁻¹ is computed from the stacked rows
[c₁a₁; c₂a₂; ...], [s₁; s₂; ...]. It must equal the dense product (the same optimizer whose
oracle gives no rows) on every backend, in every scheme, for RENG and R-Kalman; rows that are
not the passes' fall back to the dense product.
"""

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from tests.helpers import mlp_layers, rel_err

NO_CLIP = dict(kl_clip=None)
# layer 0 (24 × 31 with its bias) is factored with 2·4 or 3·4 rows; layer 1 (3 × 25) is not
SIZES, BATCH = (30, 24, 3), 4


def _batches(n_steps, seed=0):
    rs = np.random.default_rng(seed)
    return [(rs.normal(size=(BATCH, SIZES[0])), np.eye(SIZES[-1])[rs.integers(0, 3, BATCH)])
            for _ in range(n_steps)]


def _steps(opt, mlp, backend, rows, batches, oracle_of=None):
    """The optimizer's updates over `batches` (curvature on the first step only, so that the
    later steps precondition with the rows handed over for the factored form alone)."""
    params = backend.tree(mlp.init(seed=1))
    state = opt.init(params, layers=mlp_layers(mlp))
    out = []
    for t, (x, y) in enumerate(batches):
        xb, yb = backend.asarray(x), backend.asarray(y)
        b = mlp.batch(params, xb, yb, layer_stats=True)
        oracle = (oracle_of or mlp.oracle)(xb, yb, rows=rows)
        upd, state = opt.update(b.grads, state, params, stats=gc.Stats(layers=b.layers),
                                oracle=oracle, curvature=t == 0, inverse=t == 0)
        out.append(backend.tree_numpy(upd))
        params = [p + u for p, u in zip(params, upd)]
    return out


def _max_err(got, ref):
    return max(rel_err(g, r) for a, b in zip(got, ref) for g, r in zip(a, b))


@pytest.mark.parametrize("scheme", ["forward", "backward", "central"])
@pytest.mark.parametrize("algorithm", ["reng", "rkalman"])
def test_factored_fd_equals_the_dense_product(backend, factored_calls, scheme, algorithm):
    mlp = MLP(SIZES, activation="tanh", loss="softmax_ce")
    build = getattr(gc, algorithm)
    kw = dict(**NO_CLIP, lr=0.5, rho=0.05, damping=0.1, gr="finite_difference",
              fd_scheme=scheme, fd_radius=1e-2, structure="kfac")
    batches = _batches(3)
    dense = _steps(build(**kw), mlp, backend, False, batches)
    assert factored_calls[0] == 0
    got = _steps(build(**kw), mlp, backend, True, batches)
    assert factored_calls[0] == 3  # layer 0 on every step; layer 1 stays dense (not cheaper)
    assert _max_err(got, dense) < 1e-12


def test_rows_that_are_not_the_passes_fall_back_to_dense(backend, factored_calls):
    """A pass whose rows come from another batch: the probe check sends the layer to the
    dense product, which still equals the reference."""
    mlp = MLP(SIZES, activation="tanh", loss="softmax_ce")
    kw = dict(**NO_CLIP, lr=0.5, rho=0.05, damping=0.1, gr="finite_difference",
              fd_radius=1e-2, structure="kfac")
    batches = _batches(3)
    other = _batches(3, seed=9)

    def wrong_rows(x, y, rows):
        oracle = mlp.oracle(x, y)
        xo = backend.asarray(other[0][0])

        def grad_rows(p):  # the right gradient, another batch's rows
            return mlp.grad(p, x, y), gc.Stats(layers=mlp.batch(p, xo, y,
                                                                 layer_stats=True).layers)
        return oracle._replace(grad_rows_fn=grad_rows if rows else None)

    dense = _steps(gc.reng(**kw), mlp, backend, False, batches)
    got = _steps(gc.reng(**kw), mlp, backend, True, batches, oracle_of=wrong_rows)
    assert _max_err(got, dense) < 1e-12


def test_a_pass_without_rows_is_preconditioned_densely(numpy_backend, factored_calls):
    """grad_rows_fn may return no Stats for a pass (None): that pass has no rows, so ĝ is not
    a product of known rows and goes dense (never the batch's own rows in its place)."""
    mlp = MLP(SIZES, activation="tanh", loss="softmax_ce")
    kw = dict(**NO_CLIP, lr=0.5, rho=0.05, damping=0.1, gr="finite_difference",
              fd_radius=1e-2, structure="kfac")

    def no_rows(x, y, rows):
        oracle = mlp.oracle(x, y)
        return oracle._replace(grad_rows_fn=(lambda p: (mlp.grad(p, x, y), None))
                               if rows else None)

    dense = _steps(gc.reng(**kw), mlp, numpy_backend, False, _batches(3))
    got = _steps(gc.reng(**kw), mlp, numpy_backend, True, _batches(3), oracle_of=no_rows)
    assert factored_calls[0] == 0
    assert _max_err(got, dense) < 1e-12


def test_mc_fisher_and_double_backprop_precondition_densely(numpy_backend, factored_calls):
    """Rows of sampled labels are not the gradient's, and a Hessian-vector product has no
    rows: neither may use the factored form."""
    mlp = MLP(SIZES, activation="tanh", loss="softmax_ce")
    base = dict(**NO_CLIP, lr=0.5, rho=0.05, damping=0.1, structure="kfac")
    for kw in (dict(gr="finite_difference", fisher="mc"), dict(gr="double_backprop")):
        _steps(gc.reng(**base, **kw), mlp, numpy_backend, True, _batches(2))
    assert factored_calls[0] == 0


def test_requirements_ask_for_the_passes_rows():
    assert gc.reng(rho=0.1, gr="finite_difference").requirements.fd_rows
    assert gc.rkalman().requirements.fd_rows  # finite differences by default
    assert not gc.reng(rho=0.1, gr="double_backprop").requirements.fd_rows
    assert not gc.reng(rho=0.0, gr="finite_difference").requirements.fd_rows
    assert not gc.reng(rho=0.1, gr="finite_difference", fisher="mc").requirements.fd_rows
    assert not gc.ring().requirements.fd_rows


def test_under_jit_the_factored_fd_agrees_with_dense(factored_calls):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    mlp = MLP(SIZES, activation="tanh", loss="softmax_ce")
    opt = gc.rkalman(**NO_CLIP, lr=0.5, rho=0.05, damping=0.1, fd_radius=1e-2,
                     structure="kfac")
    params = [jnp.asarray(p) for p in mlp.init(seed=1)]
    state = opt.init(params, layers=mlp_layers(mlp))
    (x, y), = _batches(1)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def step(rows, params, state):
        b = mlp.batch(params, x, y, layer_stats=True)
        return opt.update(b.grads, state, params, stats=gc.Stats(layers=b.layers),
                          oracle=mlp.oracle(x, y, rows=rows), curvature=True, inverse=True)

    ref, _ = jax.jit(lambda p, s: step(False, p, s))(params, state)
    assert factored_calls[0] == 0
    got, _ = jax.jit(lambda p, s: step(True, p, s))(params, state)
    assert factored_calls[0] == 1  # traced once, in the lax.cond that checks the rows
    assert max(rel_err(np.asarray(g), np.asarray(r)) for g, r in zip(got, ref)) < 1e-12
