"""A stride-1 convolution's InputGram from its padded input (`grng_core.structures.conv_gram`,
ALGORITHMS.md §2.1 "Input rows reduced early") equals that of its patches built by loops, in
float64 (NumPy): aᵀa, Σa, n and the probes' products, over kernel shapes, dilations and sizes
down to one output row or column."""

import numpy as np
import pytest

from grng_core.structures import input_gram
from grng_core.structures.conv_gram import conv_input_gram


def _patches(x, kernel, dilation):
    """Rows (b, p, q), columns (c, i, j), by loops (as F.unfold)."""
    B, C, Hp, Wp = x.shape
    (kh, kw), (dh, dw) = kernel, dilation
    ho, wo = Hp - dh * (kh - 1), Wp - dw * (kw - 1)
    a = np.empty((B, ho, wo, C, kh, kw))
    for i in range(kh):
        for j in range(kw):
            a[:, :, :, :, i, j] = np.transpose(
                x[:, :, dh * i: dh * i + ho, dw * j: dw * j + wo], (0, 2, 3, 1))
    return a.reshape(B * ho * wo, C * kh * kw)


CASES = [((2, 3, 7, 6), (3, 3), (1, 1)), ((3, 2, 9, 9), (3, 3), (2, 2)),
         ((2, 4, 6, 8), (2, 3), (1, 2)), ((1, 2, 5, 5), (5, 5), (1, 1)),
         ((2, 3, 4, 9), (4, 1), (1, 3)), ((2, 2, 1, 12), (1, 3), (1, 2)),
         ((3, 5, 8, 4), (1, 1), (1, 1)), ((2, 3, 6, 6), (3, 2), (2, 1)),
         ((2, 2, 9, 7), (3, 2), (4, 1))]  # dilation beyond the output's height (Ho = 1)


@pytest.mark.parametrize("shape,kernel,dilation", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_patches_gram(shape, kernel, dilation, bias):
    x = np.random.default_rng(sum(shape)).standard_normal(shape)
    got = conv_input_gram(x, kernel, dilation, bias, np, np.float64)
    want = input_gram.reduce_rows(_patches(x, kernel, dilation), bias, np, np.float64)
    assert got.n == want.n
    for name in ("gram", "total", "probed"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12,
                                   atol=1e-11, err_msg=name)
