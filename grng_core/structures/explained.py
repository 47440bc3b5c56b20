"""Whether a K-FAC layer's gradient is explained by its own calls (ALGORITHMS.md §2.1 "This
project", first-step check): G ≈ c·sᵀa/B + α·W on the factored form's probe vectors, with the
least-squares scalars c (global clipping, a loss scale) and α (an L2 term in the loss). What no
(c, α) explains is a use of the weight that the layer's hooked calls do not see (a functional
tie such as h @ emb.weight.T), or a gradient edited per element (clip_grad_value_, zeroed rows):
K-FAC's factors then describe only part of the gradient, which the adapters report."""

from __future__ import annotations

from typing import Any, NamedTuple

from grng_core.state import LayerLayout
from grng_core.structures import blocks, factored
from grng_core.structures.rows import rows


class Place(NamedTuple):
    """Where the check computes (what `rows` reads of a step's context)."""

    xp: Any
    sdtype: Any
    device: Any


#: Relative residual on the probes above which a gradient is not explained: far above the
#: rounding of 16-bit rows under autocast (~0.4%), far below a second use of the weight.
TOLERANCE = 2e-2


def _rows_probes(L: LayerLayout, ls, P, ctx):
    """P·(sᵀa/B)ᵀ (k × d_out) from the LayerStats `ls`: (P aᵀ) s / B; for an embedding the
    one-hot rows' product is the probes' columns at the ids."""
    xp = ctx.xp
    s = xp.astype(xp.reshape(ls.output_grads, (-1, L.d_out)), ctx.sdtype)
    if L.a_diagonal:
        ids = xp.reshape(ls.inputs, (-1,))
        batch = ids.shape[0] if ls.batch_size is None else int(ls.batch_size)
        return (xp.take(P, xp.astype(ids, xp.int64), axis=1) @ s) / batch
    r = rows(L, ls, ctx)
    return ((P @ xp.matrix_transpose(r.a)) @ r.s) / r.batch


def explained(L: LayerLayout, ls, grads, params, ctx):
    """0-d bool array: the layer's gradient (leaves `grads`) is c·sᵀa/B + α·W (leaves
    `params`) on the probes, within `TOLERANCE`."""
    xp = ctx.xp
    P = factored.probes(L.d_in_ext, xp, ctx.sdtype, ctx.device)

    def probed(leaves):
        return xp.astype(blocks.grad_probes(L, [xp.astype(x, ctx.sdtype) for x in leaves], P,
                                            xp), ctx.sdtype)
    g, w, u = probed(grads), probed(params), _rows_probes(L, ls, P, ctx)
    uu, ww, uw = xp.sum(u * u), xp.sum(w * w), xp.sum(u * w)
    gu, gw, gg = xp.sum(g * u), xp.sum(g * w), xp.sum(g * g)
    det = uu * ww - uw * uw
    solvable = det > 1e-12 * uu * ww
    safe = xp.where(solvable, det, xp.ones_like(det))
    c2, a2 = (gu * ww - gw * uw) / safe, (gw * uu - gu * uw) / safe  # both directions
    c1 = gu / xp.where(uu > 0, uu, xp.ones_like(uu))  # the rows' direction alone
    c, alpha = xp.where(solvable, c2, c1), xp.where(solvable, a2, xp.zeros_like(a2))
    res = g - c * u - alpha * w
    return xp.sum(res * res) <= (TOLERANCE * TOLERANCE) * gg
