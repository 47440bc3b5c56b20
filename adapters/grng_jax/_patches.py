"""A convolution's input patches as a gather: one strided slice of the padded input per kernel
offset, stacked (ALGORITHMS.md §2.1: a convolution's rows are its unfolded patches).

`lax.conv_general_dilated_patches` computes the same values as a convolution with one-hot
filters: on XLA:CPU, patches and Â = aᵀa together ran 1.4–1.8x slower that way for the
ResNet-style shapes of the benchmark (B = 64, 8–16 wide, 8–32 channels, 3x3 kernels), and no
faster for 32x32 images with 64 channels (jitted, 2-core Intel Xeon).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from jax import lax
from jax import numpy as jnp


def patches(x, kernel: Sequence[int], strides: Sequence[int], padding,
            dilation: Sequence[int], channel_major: bool):
    """Rows (B, *out_spatial, c_in·prod(kernel)) of a channels-last input x (B, *spatial,
    c_in), zero padded by `padding` ("SAME", "VALID" or one (low, high) pair per spatial axis,
    negative allowed). Column order: (c_in, *kernel) when `channel_major` (a weight stored
    (out, in, *kernel): equinox), else (*kernel, c_in) (a kernel (*kernel, in, out): flax)."""
    n = len(kernel)
    window = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads),
                                              (0, 0, 0)])
    out = [(size - w) // s + 1 for size, w, s in zip(xp.shape[1:-1], window, strides)]
    cols = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        start = [0, *(o * d for o, d in zip(offset, dilation)), 0]
        limit = [xp.shape[0], *(b + (m - 1) * s + 1 for b, m, s in zip(start[1:], out, strides)),
                 xp.shape[-1]]
        cols.append(lax.slice(xp, start, limit, (1, *strides, 1)))
    axis = x.ndim if channel_major else x.ndim - 1  # (..., C, K) or (..., K, C)
    stacked = jnp.stack(cols, axis=axis)
    return stacked.reshape(*stacked.shape[:n + 1], x.shape[-1] * math.prod(kernel))
