"""Factored K-FAC preconditioning against the dense float64 product (ALGORITHMS.md §2.1).

U = S⁻¹ G A⁻¹ with G = sᵀa/B is computed as (S⁻¹sᵀ)(aA⁻¹)/B where that is cheaper; a
gradient that is not c times the rows' product (an L2 term, elementwise clipping, mis-paired
rows) must fall back to the dense product and still give S⁻¹ G A⁻¹.
"""

import numpy as np
import pytest

import grng_core as gc
from grng_core.structures import factored
from tests.helpers import rel_err

NO_CLIP = dict(kl_clip=None)  # single steps against references without the §3 trust region


def _problem(rs, d_out, d_in, n, batch, bias, transposed):
    """A one-layer params dict, its LayerSpec, rows and the gradient sᵀa/B in its layout."""
    a = rs.normal(size=(n, d_in))
    s = rs.normal(size=(n, d_out))
    a_ext = np.concatenate([a, np.ones((n, 1))], axis=1) if bias else a
    G = s.T @ a_ext / batch  # (d_out, d_in')
    W = G[:, :d_in].T if transposed else G[:, :d_in]
    grads = {"w": W.copy()}
    params = {"w": rs.normal(size=W.shape)}
    if bias:
        grads["b"] = G[:, d_in].copy()
        params["b"] = rs.normal(size=(d_out,))
    spec = gc.LayerSpec("w", "b" if bias else None, transposed)
    return params, grads, spec, (a, s)


def _to_matrix(leaves, d_in, bias, transposed):
    W = leaves["w"].T if transposed else leaves["w"]
    return np.concatenate([W, leaves["b"][:, None]], axis=1) if bias else W


def _stats(spec, rows, batch, backend):
    a, s = rows
    return gc.Stats(layers=[gc.LayerStats(spec.weight, spec.bias, backend.asarray(a),
                                          backend.asarray(s), spec.transposed,
                                          batch_size=batch)])


def _run(backend, params, grads, spec, rows, batch, factored_calls):
    """Two RING steps (rho = 0: d = (F + λI)⁻¹ g): a refresh with a first batch, then a step
    that refreshes nothing, given the rows of `grads` (factored) and not (dense)."""
    opt = gc.ring(**NO_CLIP, lr=1.0, rho=0.0, damping=0.3, inverse_method="cholesky")
    p = backend.tree(params)
    rs = np.random.default_rng(7)
    first = (rs.normal(size=rows[0].shape), rs.normal(size=rows[1].shape))
    state = opt.init(p, layers=[spec])
    _, state = opt.update(backend.tree(grads), state, p, stats=_stats(spec, first, batch, backend),
                          curvature=True, inverse=True)
    before = factored_calls[0]
    with_rows, _ = opt.update(backend.tree(grads), state, p,
                              stats=_stats(spec, rows, batch, backend),
                              curvature=False, inverse=False)
    used = factored_calls[0] - before
    dense, _ = opt.update(backend.tree(grads), state, p, curvature=False, inverse=False)
    layer = state.curvature.kfac[0]
    A_inv, S_inv = backend.to_numpy(layer.A_inv), backend.to_numpy(layer.S_inv)
    return backend.tree_numpy(with_rows), backend.tree_numpy(dense), A_inv, S_inv, used


@pytest.mark.parametrize("transposed", [False, True], ids=["torch_layout", "jax_layout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("n,batch", [(8, 8), (12, 4)], ids=["dense_rows", "conv_rows"])
def test_factored_equals_dense_reference(backend, factored_calls, transposed, bias, n, batch):
    rs = np.random.default_rng(0)
    d_out, d_in = 30, 40  # n < d: the factored form is cheaper
    params, grads, spec, rows = _problem(rs, d_out, d_in, n, batch, bias, transposed)
    with_rows, dense, A_inv, S_inv, used = _run(backend, params, grads, spec, rows, batch,
                                                factored_calls)
    assert used == 1  # the factored form ran
    U_ref = -(S_inv @ _to_matrix(grads, d_in, bias, transposed) @ A_inv)
    assert rel_err(_to_matrix(with_rows, d_in, bias, transposed), U_ref) < 1e-12
    assert rel_err(_to_matrix(dense, d_in, bias, transposed), U_ref) < 1e-12


def test_more_rows_than_width_uses_the_dense_product(backend, factored_calls):
    rs = np.random.default_rng(1)
    params, grads, spec, rows = _problem(rs, 6, 5, 64, 64, True, False)
    assert not factored.cheaper(6, 6, 64)
    with_rows, dense, *_ , used = _run(backend, params, grads, spec, rows, 64, factored_calls)
    assert used == 0
    assert rel_err(with_rows["w"], dense["w"]) < 1e-14


def _l2(grads, params):
    return {k: g + 1e-3 * params[k] for k, g in grads.items()}


def _clip_each(grads, params):
    return {k: np.clip(g, -0.01, 0.01) for k, g in grads.items()}


def _tied(grads, params):
    rs = np.random.default_rng(5)
    out = dict(grads)
    out["w"] = grads["w"] + 1e-2 * np.outer(rs.normal(size=grads["w"].shape[0]),
                                            rs.normal(size=grads["w"].shape[1]))
    return out


@pytest.mark.parametrize("change", [_l2, _clip_each, _tied], ids=["l2_term", "clip_value", "tied"])
def test_a_gradient_that_is_not_the_rows_product_is_preconditioned_densely(backend, factored_calls,
                                                                           change):
    rs = np.random.default_rng(2)
    params, grads, spec, rows = _problem(rs, 30, 40, 8, 8, True, False)
    grads = change(grads, params)
    with_rows, dense, A_inv, S_inv, used = _run(backend, params, grads, spec, rows, 8,
                                                factored_calls)
    assert used == 0
    U_ref = -(S_inv @ _to_matrix(grads, 40, True, False) @ A_inv)
    assert rel_err(_to_matrix(with_rows, 40, True, False), U_ref) < 1e-12


def test_mispaired_rows_fall_back(backend, factored_calls):
    """Accumulated micro-batches whose rows are not paired (s reversed against a)."""
    rs = np.random.default_rng(3)
    params, grads, spec, (a, s) = _problem(rs, 30, 40, 8, 8, True, False)
    with_rows, dense, *_, used = _run(backend, params, grads, spec, (a, s[::-1].copy()), 8,
                                      factored_calls)
    assert used == 0
    assert rel_err(with_rows["w"], dense["w"]) < 1e-14


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_a_globally_scaled_gradient_stays_factored_and_exact(backend, factored_calls, scale):
    """Global-norm clipping (or a loss scale) multiplies G by one c: still the product."""
    rs = np.random.default_rng(4)
    params, grads, spec, rows = _problem(rs, 30, 40, 8, 8, True, False)
    grads = {k: scale * g for k, g in grads.items()}
    with_rows, dense, A_inv, S_inv, used = _run(backend, params, grads, spec, rows, 8,
                                                factored_calls)
    assert used == 1
    U_ref = -(S_inv @ _to_matrix(grads, 40, True, False) @ A_inv)
    assert rel_err(_to_matrix(with_rows, 40, True, False), U_ref) < 1e-12


@pytest.mark.parametrize("change", [None, _l2], ids=["product", "l2_term"])
def test_under_jit_both_paths_agree_with_the_reference(change):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rs = np.random.default_rng(6)
    params, grads, spec, rows = _problem(rs, 30, 40, 8, 8, True, True)
    if change is not None:
        grads = change(grads, params)
    opt = gc.ring(**NO_CLIP, lr=1.0, rho=0.0, damping=0.3)
    # keys in sorted order: jit rebuilds dicts sorted, the layout's positions must agree
    p = {k: jnp.asarray(params[k]) for k in sorted(params)}
    g = {k: jnp.asarray(grads[k]) for k in sorted(grads)}

    def stats(a, s):
        return gc.Stats(layers=[gc.LayerStats("w", "b", a, s, True, batch_size=8)])

    a, s = jnp.asarray(rows[0]), jnp.asarray(rows[1])
    state = opt.init(p, layers=[spec])
    _, state = opt.update(g, state, p, stats=stats(a, s), curvature=True, inverse=True)
    step = jax.jit(lambda g, st, p, a, s: opt.update(g, st, p, stats=stats(a, s),
                                                     curvature=False, inverse=False)[0])
    got = {k: np.asarray(v) for k, v in step(g, state, p, a, s).items()}
    layer = state.curvature.kfac[0]
    U_ref = -(np.asarray(layer.S_inv) @ _to_matrix(grads, 40, True, True)
              @ np.asarray(layer.A_inv))
    assert rel_err(_to_matrix(got, 40, True, True), U_ref) < 1e-12


def test_cost_model():
    assert factored.cheaper(1024, 785, 128)  # the 4.5x case
    d_out, d_in, n = 1024, 785, 128
    ratio = d_out * d_in * (d_out + d_in) / (n * (d_out**2 + d_in**2 + d_out * d_in))
    assert 4.4 < ratio < 4.8
    assert not factored.cheaper(10, 11, 128)
