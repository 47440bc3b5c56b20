"""Whether a K-FAC layer's gradient is explained by its own calls (ALGORITHMS.md §2.1 "This
project", first-step check): G ≈ c·sᵀa/B + α·W + β·b on the factored form's probe vectors,
with least-squares scalars c (global clipping, a loss scale; the bias column's own, for a
gradient rescaled per leaf), α and β (an L2 term in the loss
on the weight, on the bias: often the bias is left out of it). What none explains is a use of
the weight that the layer's hooked calls do not see (a functional tie such as
h @ emb.weight.T), or a gradient edited per element (clip_grad_value_, zeroed rows): K-FAC's
factors then describe only part of the gradient, which the adapters report."""

from __future__ import annotations

from typing import Any, NamedTuple

from grng_core.state import LayerLayout
from grng_core.structures import blocks, factored
from grng_core.structures.rows import check_pairing
from grng_core.types import InputGram


class Place(NamedTuple):
    """Where the check computes: the namespace, the dtype and the device of its probes."""

    xp: Any
    sdtype: Any
    device: Any


#: Relative residual on the probes above which a gradient is not explained: far above the
#: rounding of 16-bit rows under autocast (~0.4%), far below a second use of the weight.
TOLERANCE = 2e-2


def _rows_probes(L: LayerLayout, ls, P, place: Place):
    """P·(sᵀa/B)ᵀ = ((P aᵀ) s)/B (k × d_out) from the LayerStats `ls`, without appending the
    bias column to the rows (a copy of every row: P's last column is added instead); for an
    embedding the one-hot rows' product is the probes' columns at the ids. Of a dense layer
    with a bias, [weight part, bias column's part]: each its own direction."""
    xp = place.xp
    s = xp.astype(xp.reshape(ls.output_grads, (-1, L.d_out)), place.sdtype, copy=False)
    batch = s.shape[0] if ls.batch_size is None else int(ls.batch_size)
    if L.a_diagonal:
        ids = xp.reshape(ls.inputs, (-1,))
        check_pairing(L, ls, ids.shape[0], s.shape[0])
        if ids.dtype not in (xp.int32, xp.int64):  # (int32 kept: JAX without x64 has no int64)
            ids = xp.astype(ids, xp.int64)
        return (xp.take(P, ids, axis=1) @ s) / batch
    if isinstance(ls.inputs, InputGram):  # rows reduced as they arrived: P·a'ᵀ kept
        check_pairing(L, ls, ls.inputs.n, s.shape[0])
        return (xp.astype(ls.inputs.probed, place.sdtype, copy=False) @ s) / batch
    a = xp.astype(xp.reshape(ls.inputs, (-1, L.d_in)), place.sdtype, copy=False)
    check_pairing(L, ls, a.shape[0], s.shape[0])
    weight = ((P[:, :L.d_in] @ xp.matrix_transpose(a)) @ s) / batch
    if L.bias is None:
        return weight
    # the bias column apart, with its own scalar: a gradient rescaled per leaf (optax's
    # clip_by_block_rms, torch clip_grad_norm_ on each parameter) is its rows' product too
    return [weight, (P[:, L.d_in:] @ xp.sum(s, axis=0, keepdims=True)) / batch]


def _parts(L: LayerLayout, leaves, P, place: Place) -> list:
    """`blocks.probe_parts` of the layer's own leaves in the check's dtype (cast without a
    copy where they have it; the model's other leaves untouched)."""
    xp = place.xp
    mine = {i: xp.astype(leaves[i], place.sdtype, copy=False) for i in L.positions}
    return blocks.probe_parts(L, mine, P, xp)


def _residual(g, directions, xp):
    """g less its projection on the span of `directions` (Gram–Schmidt; a direction within
    rounding of the earlier ones' span, or zero, is dropped)."""
    basis: list = []
    for d in directions:
        v = d
        for q in basis:
            v = v - xp.sum(v * q) * q
        n2, ref = xp.sum(v * v), xp.sum(d * d)
        keep = n2 > 1e-12 * ref
        basis.append(xp.where(keep, v / xp.sqrt(xp.where(keep, n2, xp.ones_like(n2))),
                              xp.zeros_like(v)))
    for q in basis:
        g = g - xp.sum(g * q) * q
    return g


def explained(L: LayerLayout, ls, grads, params, place: Place):
    """0-d bool array: the layer's gradient (leaves `grads`) is c·sᵀa/B + α·W + β·b (leaves
    `params`) on the probes, within `TOLERANCE`; true for a non-finite gradient (that step is
    skipped and reported as such)."""
    xp = place.xp
    P = factored.probes(L.d_in_ext, xp, place.sdtype, place.device)
    g = sum(_parts(L, grads, P, place))
    rows = _rows_probes(L, ls, P, place)
    res = _residual(g, [*(rows if isinstance(rows, list) else [rows]),
                        *_parts(L, params, P, place)], xp)
    gg = xp.sum(g * g)
    ok = xp.sum(res * res) <= (TOLERANCE * TOLERANCE) * gg
    return xp.where(xp.isfinite(gg), ok, xp.ones_like(ok))
