"""grng_core.structures.blocks: a layer's d_out × d_in' products by blocks (weight block and bias
column) equal the dense float64 products of the assembled G = [W | b], in both weight layouts
(torch (out, in) and JAX (in, out)), with and without bias (ALGORITHMS.md §2.1)."""

import numpy as np
import pytest

from grng_core.state import LayerLayout
from grng_core.structures import blocks


def _layout(d_out, d_in, bias, transposed):
    return LayerLayout(weight=0, bias=1 if bias else None, transposed=transposed,
                       d_in=d_in, d_out=d_out)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_products_by_blocks_equal_the_assembled_matrix(backend, bias, transposed):
    rs = np.random.default_rng(0)
    d_out, d_in = 5, 4
    L = _layout(d_out, d_in, bias, transposed)
    G = rs.normal(size=(d_out, d_in + bias))
    leaves = [backend.asarray(G[:, :d_in].T if transposed else G[:, :d_in])]
    if bias:
        leaves.append(backend.asarray(G[:, d_in]))
    S, A = rs.normal(size=(d_out, d_out)), rs.normal(size=(d_in + bias, d_in + bias))
    P = rs.normal(size=(2, d_in + bias))
    xp = backend.xp
    left = blocks.left_multiply(backend.asarray(S), L, leaves, xp)
    np.testing.assert_allclose(backend.to_numpy(left), S @ G, rtol=1e-13)
    U = blocks.product(left, backend.asarray(A), L)
    shapes = [tuple(x.shape) for x in leaves]
    out = blocks.to_leaves(L, U, shapes, xp)
    want = S @ G @ A
    W = backend.to_numpy(out[0])
    np.testing.assert_allclose(W.T if transposed else W, want[:, :d_in], rtol=1e-13)
    if bias:
        np.testing.assert_allclose(backend.to_numpy(out[1]), want[:, d_in], rtol=1e-13)
    probes = blocks.grad_probes(L, leaves, backend.asarray(P), xp)
    np.testing.assert_allclose(backend.to_numpy(probes), P @ G.T, rtol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
def test_traced_products_stay_joined_and_equal_the_reference(bias):
    """Under jax.jit the products are one joined matrix (`blocks.Joined`, the module's traced
    policy) and the leaves still equal S·G·A in float64."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rs = np.random.default_rng(1)
    d_out, d_in = 3, 5
    L = _layout(d_out, d_in, bias, True)
    G = rs.normal(size=(d_out, d_in + bias))
    S, A = rs.normal(size=(d_out, d_out)), rs.normal(size=(d_in + bias, d_in + bias))
    leaves = [jnp.asarray(G[:, :d_in].T)] + ([jnp.asarray(G[:, d_in])] if bias else [])
    kinds = []

    def run(S, A, leaves):
        U = blocks.product(blocks.left_multiply(S, L, leaves, jnp), A, L)
        kinds.append(type(U).__name__)
        return blocks.to_leaves(L, U, [tuple(x.shape) for x in leaves], jnp)

    out = jax.jit(run)(jnp.asarray(S), jnp.asarray(A), leaves)
    assert kinds == ["Joined"]
    want = S @ G @ A
    np.testing.assert_allclose(np.asarray(out[0]).T, want[:, :d_in], rtol=1e-13)
    if bias:
        np.testing.assert_allclose(np.asarray(out[1]), want[:, d_in], rtol=1e-13)
    run(jnp.asarray(S), jnp.asarray(A), leaves)  # eager JAX arrays: by blocks
    assert kinds[-1] == "Blocks"
