"""A K-FAC layer's batch rows in the state dtype (ALGORITHMS.md §2.1): `LayerRows`, `rows`."""

from __future__ import annotations

from typing import Any, NamedTuple

from grng_core.state import LayerLayout


class LayerRows(NamedTuple):
    """a (n × d_in', the ones column appended for a bias), s (n × d_out, rows B·∂L/∂z) and
    B, the number of examples they come from (n = B for a dense layer, B·T for shared
    weights): the layer's gradient is G = sᵀa/B, its factors Â = aᵀa/n and Ŝ = sᵀs/B."""

    a: Any
    s: Any
    batch: int


def rows(L: LayerLayout, ls, ctx) -> LayerRows:
    """The rows of LayerStats `ls` for layout `L`, cast to the state dtype."""
    xp = ctx.xp
    a = xp.astype(xp.reshape(ls.inputs, (-1, L.d_in)), ctx.sdtype, copy=False)
    s = xp.astype(xp.reshape(ls.output_grads, (-1, L.d_out)), ctx.sdtype, copy=False)
    if a.shape[0] != s.shape[0]:
        raise ValueError(f"LayerStats of weight {ls.weight!r}: inputs have {a.shape[0]} rows, "
                         f"output_grads {s.shape[0]}: they must pair row for row")
    batch = getattr(ls, "batch_size", None)
    batch = a.shape[0] if batch is None else int(batch)
    if batch < 1:
        raise ValueError(f"LayerStats of weight {ls.weight!r}: batch_size={batch} must be >= 1")
    if L.bias is not None:
        a = xp.concat([a, xp.ones((a.shape[0], 1), dtype=ctx.sdtype, device=ctx.device)], axis=1)
    return LayerRows(a, s, batch)
