"""A stride-1 convolution's `InputGram` from its zero-padded input, without its patches
(ALGORITHMS.md §2.1, "Input rows reduced early").

The patch of output position (b, p, q) holds x[b, c, p + dh·i, q + dw·j] in column (c, i, j) (as
`F.unfold`). Split by kernel row i, a patch is kh "row patches" r_u = x[b, :, u, q + dw·j] (C·kw
values) of input rows u = p + dh·i, so aᵀa's block (i, i') is Σ_p Σ_{b,q} r_{p+dh·i} r_{p+dh·i'}ᵀ:
one product of the row patches of rows [dh·i, dh·i + Ho) with those dh·(i' − i) rows below. The
row patches are kw copies of the input (im2col's patches are kh·kw), and the blocks of one
offset δ = i' − i differ only by the dh rows at either end of their windows, so each δ costs one
product over all rows and small corrections: about kh (C·kw)² multiply-adds per output
position, against (C·kh·kw)² for aᵀa of the patches.
"""

from __future__ import annotations

from grng_core.structures import factored
from grng_core.tree import device
from grng_core.types import InputGram


def _row_patches(x, kw: int, dw: int, wo: int, xp):
    """(Hp, B·Wo, kw·C): per input row u, the row patches r_u, rows (b, q), columns (j, c).
    The input is first laid out channels-last (one copy; none where it is already), so that
    the gather of the kw copies reads runs of C contiguous values."""
    B, C, Hp, Wp = x.shape
    nhwc = xp.reshape(xp.reshape(xp.permute_dims(x, (0, 2, 3, 1)), (B, -1)), (B, Hp, Wp, C))
    rows_first = xp.permute_dims(nhwc, (1, 0, 2, 3))  # (Hp, B, Wp, C), C still contiguous
    cols = xp.stack([rows_first[:, :, dw * j: dw * j + wo, :] for j in range(kw)], axis=-2)
    return xp.reshape(cols, (Hp, B * wo, kw * C))


def _blocks(R, kh: int, dh: int, ho: int, xp) -> dict:
    """{(i, i'): Σ_{u in [dh·i, dh·i + Ho)} R[u]ᵀ R[u + dh·(i' − i)]} for i ≤ i'."""
    m = R.shape[-1]

    def prod(lo: int, hi: int, shift: int):  # Σ_{u in [lo, hi)} R[u]ᵀ R[u + shift]
        a = xp.reshape(R[lo:hi], (-1, m))
        return xp.matrix_transpose(a) @ xp.reshape(R[lo + shift:hi + shift], (-1, m))
    out = {}
    for delta in range(kh):
        shift = dh * delta
        T = prod(0, ho, shift)
        out[(0, delta)] = T
        for i in range(1, kh - delta):  # the window moves down dh rows
            start = dh * (i - 1)
            T = T - prod(start, start + dh, shift) + prod(start + ho, start + ho + dh, shift)
            out[(i, i + delta)] = T
    return out


def conv_input_gram(x, kernel: tuple, dilation: tuple, has_bias: bool, xp, dtype) -> InputGram:
    """The InputGram of a stride-1 convolution's patches: x its input (B, C, Hp, Wp), already
    zero-padded, kernel (kh, kw), dilation (dh, dw); computed in `dtype`. Rows in the patches'
    order (b, p, q), columns (c, i, j) (the row patches' (j, c) reordered at the end);
    `probed` with `factored.probes` of d_in + has_bias."""
    x = xp.astype(x, dtype, copy=False)
    B, C, Hp, Wp = x.shape
    (kh, kw), (dh, dw) = kernel, dilation
    ho, wo = Hp - dh * (kh - 1), Wp - dw * (kw - 1)
    m, d = C * kw, C * kh * kw
    R = _row_patches(x, kw, dw, wo, xp)
    blocks = _blocks(R, kh, dh, ho, xp)
    rows = [xp.concat([blocks[(i, k)] if i <= k else xp.matrix_transpose(blocks[(k, i)])
                       for k in range(kh)], axis=1) for i in range(kh)]
    gram = xp.reshape(xp.permute_dims(xp.reshape(xp.concat(rows, axis=0), (kh, kw, C, kh, kw, C)),
                                      (2, 0, 1, 5, 3, 4)), (d, d))
    sums = xp.sum(R, axis=1)  # (Hp, m): each input row's row patches summed
    total = xp.stack([xp.sum(sums[dh * i: dh * i + ho], axis=0) for i in range(kh)])
    total = xp.reshape(xp.permute_dims(xp.reshape(total, (kh, kw, C)), (2, 0, 1)), (d,))
    P = factored.probes(d + int(has_bias), xp, dtype, device(x))
    Pi = xp.reshape(xp.permute_dims(xp.reshape(P[:, :d], (2, C, kh, kw)), (2, 0, 3, 1)),
                    (kh, 2, m))  # per kernel row, the probes' columns (j, c)
    probed = None  # (2, Ho·B·Wo), columns (p, b, q): two-row products (BLAS runs them fast)
    for i in range(kh):
        term = Pi[i] @ xp.matrix_transpose(xp.reshape(R[dh * i: dh * i + ho], (-1, m)))
        probed = term if probed is None else probed + term
    probed = xp.reshape(xp.permute_dims(xp.reshape(probed, (2, ho, B, wo)), (0, 2, 1, 3)),
                        (2, B * ho * wo))
    if has_bias:
        probed = probed + P[:, d:]
    return InputGram(gram=gram, total=total, n=B * ho * wo, probed=probed)
