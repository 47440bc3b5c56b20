"""A K-FAC layer's batch rows in the state dtype (ALGORITHMS.md §2.1): `LayerRows`, `rows`."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

from grng_core.state import LayerLayout
from grng_core.tree import device
from grng_core.types import InputGram
from grng_core.user_frame import user_stacklevel


def frequencies(ids, d: int, xp, dtype, device):
    """counts(id = j)/n for j < d, from sorted ids (no n × d one-hot): the diagonal of Â. The
    ids keep their integer dtype where it holds d (JAX without x64 has no int64 to cast to)."""
    if not xp.isdtype(ids.dtype, "integral") or xp.iinfo(ids.dtype).max < d:
        ids = xp.astype(ids, xp.int64)
    ordered = xp.sort(ids)
    edges = xp.searchsorted(ordered, xp.arange(d + 1, dtype=ordered.dtype, device=device))
    counts = edges[1:] - edges[:-1]
    return xp.astype(counts, dtype) / ids.shape[0]


def shared_by_batch(shape: tuple, examples: int | None, axis: int = 0,
                    features: int = 1, example_shapes: tuple = ()) -> str | None:
    """Why a layer call's input cannot give per-example K-FAC rows (ALGORITHMS.md §2.1, "This
    project": inputs the batch shares), or None. `shape`: the call's input, its last `features`
    axes the layer's features (0 for token ids); `examples`: the model call's batch size, on
    axis `axis` of its inputs; `example_shapes`: the shapes of one example of the model call's
    inputs (their shapes without axis `axis`). In a call of more than one example, shared:
    - that axis is 1 on ids of two or more axes (GPT-2's and BERT's position ids, (1, T)) or
      on features with a position axis (1, T, d); not one row of features (1, d), which is as
      likely one example's (a mixture of experts' token routed alone, a selected example);
      with `axis` > 0 (a sequence-first model) an input whose axis 0 has the examples' size is
      a batch-first one inside the model, not shared;
    - or the input is ids (`features` 0) of one example's shape (at least one axis) that do not
      hold the examples on `axis` (nanoGPT's position ids `arange(T)`, (T,), for inputs
      (B, T)): T = B cannot be told from a batch and is not recognised. Only ids: a dense
      input (T, d) is also a sequence-first model's (B, d) head read with the default axis;
    - or ids of two or more axes, none of them the examples', each an axis of one example
      (T5's relative-position buckets (T_q, T_k) for inputs (B, T)); ids (B·C, T) flattened
      from (B, C, T) (multiple choice) hold the examples and are not taken for them.
    Its output is broadcast over the examples, so its output gradient is already their sum."""
    if examples is None or examples <= 1:
        return None
    positions = tuple(shape[:len(shape) - features])
    one_example = (features == 0 and len(positions) >= 1 and positions in example_shapes
                   and (len(positions) <= axis or positions[axis] != examples))
    lengths = {n for e in example_shapes for n in e}
    pairwise = (features == 0 and len(positions) >= 2 and examples not in positions
                and all(n in lengths for n in positions))
    if not (one_example or pairwise) and (
            len(shape) < 2 + (features > 0) or len(shape) - features <= axis or shape[axis] != 1
            or (axis != 0 and shape[0] == examples)):  # a batch-first input inside the model
        return None
    return shared_text(shape, examples)


def shared_text(shape: tuple, examples: int) -> str:
    """`shared_by_batch`'s reason for an input of `shape` shared by `examples` examples."""
    return (f"called on an input of shape {tuple(shape)} shared by a batch of {examples} "
            "examples (its output is broadcast over them, so its output gradient is summed over "
            "the examples: no per-example K-FAC rows)")


def ambiguous_ids(shape: tuple, examples: int | None, axis: int = 0,
                  example_shapes: tuple = ()) -> bool:
    """Token ids of one example's shape whose axis `axis` equals the examples' count (T = B):
    position ids shared by the batch (`arange(T)`, `shared_by_batch`'s case) or per-example ids
    (B,), which shapes cannot tell apart. The adapters warn: such a layer stays on K-FAC."""
    return (examples is not None and examples > 1 and len(shape) > axis
            and tuple(shape) in example_shapes and shape[axis] == examples)


class LayerRows(NamedTuple):
    """a (n × d_in', the ones column appended for a bias), s (n × d_out, rows B·∂L/∂z) and
    B, the number of examples they come from (n = B for a dense layer, B·T for shared
    weights): the layer's gradient is G = sᵀa/B, its factors Â = aᵀa/n and Ŝ = sᵀs/B.
    For an embedding (one-hot rows) `a` is Â's diagonal itself, the token frequencies
    counts/n, a vector (d_in,). `tol`: the factored form's check tolerance where the rows
    arrived in float32 and the state is wider (√eps of float32; 0: the state's own). `gram`:
    a'ᵀa' (d_in' × d_in') where the rows arrived reduced (`InputGram`), `a` then None: such a
    layer is preconditioned densely (`input_gram`)."""

    a: Any
    s: Any
    batch: int
    tol: float = 0.0
    gram: Any = None


def check_pairing(L: LayerLayout, ls, n_inputs: int, n_grads: int) -> None:
    """A layer's input rows (token ids) and output-gradient rows pair one for one."""
    if n_inputs == n_grads:
        return
    if L.a_diagonal:
        raise ValueError(f"LayerStats of embedding {ls.weight!r}: {n_inputs} token ids, "
                         f"output_grads {n_grads} rows: they must pair row for row")
    raise ValueError(f"LayerStats of weight {ls.weight!r}: inputs have {n_inputs} rows, "
                     f"output_grads {n_grads}: they must pair row for row (one input row per "
                     "output-gradient row: for shared weights, B·T of each)")


def rows(L: LayerLayout, ls, ctx) -> LayerRows:
    """The rows of LayerStats `ls` for layout `L`, cast to the state dtype."""
    xp = ctx.xp
    s = xp.astype(xp.reshape(ls.output_grads, (-1, L.d_out)), ctx.sdtype, copy=False)
    if L.a_diagonal:
        ids = xp.reshape(ls.inputs, (-1,))
        check_pairing(L, ls, ids.shape[0], s.shape[0])
        batch = getattr(ls, "batch_size", None)
        return LayerRows(frequencies(ids, L.d_in, xp, ctx.sdtype, ctx.device), s,
                         ids.shape[0] if batch is None else int(batch))
    reduced = isinstance(ls.inputs, InputGram)
    n = ls.inputs.n if reduced else math.prod(ls.inputs.shape[:-1])
    check_pairing(L, ls, n, s.shape[0])
    batch = getattr(ls, "batch_size", None)
    batch = n if batch is None else int(batch)
    if batch < 1:
        raise ValueError(f"LayerStats of weight {ls.weight!r}: batch_size={batch} must be >= 1"
                         + (" (an empty batch: skip the step, or drop the last empty batch "
                            "of the loader)" if n == 0 else ""))
    if reduced:
        g = cast(ls.inputs, xp, ctx.sdtype)
        return LayerRows(None, s, batch, gram=augmented(g, L.bias is not None, xp))
    a = xp.astype(xp.reshape(ls.inputs, (-1, L.d_in)), ctx.sdtype, copy=False)
    if L.bias is not None:
        a = xp.concat([a, xp.ones((a.shape[0], 1), dtype=ctx.sdtype, device=ctx.device)], axis=1)
    return LayerRows(a, s, batch, _arrival_tol((ls.inputs, ls.output_grads), ctx))


def augmented(g: InputGram, has_bias: bool, xp):
    """a'ᵀa' (d_in' × d_in') of an `InputGram` (rows reduced as they arrived, §2.1): aᵀa,
    bordered by Σ a and n where the layer has a bias (a' = [a | 1])."""
    if not has_bias:
        return g.gram
    t = g.total[:, None]
    n = xp.full((1, 1), g.n, dtype=g.gram.dtype, device=device(g.gram))
    return xp.concat([xp.concat([g.gram, t], axis=1),
                      xp.concat([xp.matrix_transpose(t), n], axis=1)], axis=0)


def cast(g: InputGram, xp, dtype) -> InputGram:
    """An `InputGram` with its arrays in `dtype` (no copy where they have it)."""
    return g._replace(**{k: xp.astype(getattr(g, k), dtype, copy=False)
                         for k in ("gram", "total", "probed")})


def _arrival_tol(arrays, ctx) -> float:
    """√eps of float32 where rows that arrived in float32 were cast to a wider state dtype
    (float32 parameters with `state_dtype="float64"`): their product matches the gradient to
    float32's rounding only. Narrower rows (16-bit) keep the state's tolerance, so the check
    sends them to the dense product rather than admit a 16-bit-sized difference."""
    xp = ctx.xp
    if xp.finfo(ctx.sdtype).eps >= xp.finfo(xp.float32).eps:
        return 0.0
    if any(x.dtype == xp.float32 for x in arrays):
        return math.sqrt(float(xp.finfo(xp.float32).eps))
    return 0.0


def warn_unstated_batch(stats, layer_rows) -> None:
    """Warn when a layer's LayerStats has no batch_size and more rows than another layer's
    batch (a convolution's B·P positions or a sequence's B·T tokens taken for B·P examples):
    its factors and factored gradient would be scaled as if by that many examples (§2.1,
    n = B·T rows for shared weights). Rows the model's layers all give one per example agree."""
    batches = {r.batch for r in layer_rows if r is not None}
    for ls, r in zip(stats, layer_rows):
        if ls is None or r is None or getattr(ls, "batch_size", None) is not None:
            continue
        smaller = [b for b in batches if b < r.batch]
        if smaller:
            warnings.warn(
                f"LayerStats of weight {ls.weight!r}: {r.batch} rows and no batch_size, so "
                f"taken for {r.batch} examples, while another layer's batch is "
                f"{min(smaller)}: rows of shared weights (a convolution's positions, a "
                f"sequence's tokens) need batch_size=B (ALGORITHMS.md §2.1)",
                UserWarning, stacklevel=user_stacklevel())
