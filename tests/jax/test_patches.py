"""grng_jax._patches: a convolution's patches gathered by strided slices equal
`lax.conv_general_dilated_patches` exactly (a gather, no arithmetic) in both column orders,
over strides, dilations, SAME / VALID / explicit (asymmetric, negative) padding and 1–3
spatial axes, jitted and differentiated."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from grng_jax._patches import patches
from jax import lax

CASES = [
    ((2, 7, 6, 3), (3, 3), (1, 1), "SAME", (1, 1)),
    ((2, 9, 8, 3), (2, 3), (2, 1), ((1, 0), (0, 2)), (1, 2)),
    ((3, 9, 9, 2), (4, 4), (1, 1), "SAME", (2, 2)),  # even kernel: asymmetric SAME
    ((2, 10, 11, 2), (3, 3), (3, 3), "VALID", (1, 1)),  # positions left over at the edge
    ((2, 13, 3), (4,), (2,), ((2, 2),), (2,)),
    ((2, 5, 6, 7, 2), (2, 3, 2), (1, 2, 1), "SAME", (1, 1, 2)),
    ((2, 9, 9, 2), (3, 3), (1, 1), ((-1, 1), (1, -1)), (1, 1)),  # negative padding crops
]


def _reference(x, kernel, strides, padding, dilation, channel_major):
    sp = "DHW"[-len(kernel):]
    ref = lax.conv_general_dilated_patches(x, kernel, strides, padding, rhs_dilation=dilation,
                                           dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"))
    if channel_major:  # conv_general_dilated_patches' own order, (c_in, *kernel)
        return ref
    c, k = x.shape[-1], math.prod(kernel)
    return jnp.swapaxes(ref.reshape(*ref.shape[:-1], c, k), -1, -2).reshape(ref.shape)


@pytest.mark.parametrize("channel_major", [True, False], ids=["c-kernel", "kernel-c"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_patches_equal_conv_general_dilated_patches(case, channel_major):
    shape, kernel, strides, padding, dilation = case
    x = jax.random.normal(jax.random.PRNGKey(0), shape, dtype=jnp.float64)
    want = _reference(x, kernel, strides, padding, dilation, channel_major)
    got = jax.jit(lambda x: patches(x, kernel, strides, padding, dilation, channel_major))(x)
    assert got.shape == want.shape
    assert bool(jnp.array_equal(got, want))
    # the gather's transpose (a scatter-add) is the reference's input gradient
    cot = jax.random.normal(jax.random.PRNGKey(1), want.shape, dtype=jnp.float64)
    g_got = jax.grad(lambda x: jnp.sum(patches(x, kernel, strides, padding, dilation,
                                                channel_major) * cot))(x)
    g_want = jax.grad(lambda x: jnp.sum(_reference(x, kernel, strides, padding, dilation,
                                                   channel_major) * cot))(x)
    assert jnp.allclose(g_got, g_want, rtol=1e-12, atol=1e-12)
