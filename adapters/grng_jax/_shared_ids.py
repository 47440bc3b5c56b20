"""Token ids whose shape cannot tell shared positions from per-example ids (T = B), told apart
by a second abstract trace of the loss with one more example (ALGORITHMS.md §2.1, "This
project": inputs the batch shares; `grng_core.structures.rows.ambiguous_ids`).

An embedding called on `arange(T)` (nanoGPT's positions) for inputs (B, T) has ids of shape
(T,): one example's shape, which `shared_by_batch` recognises, unless T = B, when they look
like one id per example. grng_torch can only warn then. Here the loss is traced again
(`jax.eval_shape`: shapes only, no computation) on a batch of B + 1 examples: ids whose shape
does not follow the batch are shared by it. A loss that cannot take B + 1 examples (a shape
fixed in the model) leaves the call ambiguous, and the adapter warns as grng_torch does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax

from grng_core.structures.rows import ambiguous_ids
from grng_core.user_frame import user_stacklevel

#: Tracing the loss on another batch: (abstract batch) -> that trace's tagged calls.
Retrace = Callable[[object], list]


def ambiguous_calls(calls: list, examples: int, shapes: tuple) -> list:
    """The embedding calls whose ids are one example's shape with T = B."""
    return [c for c in calls if c.kind == "embed"
            and ambiguous_ids(tuple(c.inputs.shape), examples, 0, shapes)]


def one_more_example(batch):
    """The batch's abstract leaves with one more example on axis 0."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype), batch)


def shared_ids(calls: list, batch, examples: int, shapes: tuple, retrace: Retrace,
               label: Callable[[int], str]) -> set[int]:
    """Weights (leaf indices) of the ambiguous embedding calls whose ids keep their shape when
    the batch grows by one example (shared positions). Where the loss cannot be traced on
    B + 1 examples, each ambiguous layer is warned about (named by `label`) and stays."""
    unclear = ambiguous_calls(calls, examples, shapes)
    if not unclear:
        return set()
    try:
        again = retrace(one_more_example(batch))
    except Exception:  # a model with the batch size fixed in it: the shapes cannot tell
        for w in sorted({c.weight for c in unclear}):
            _warn(label(w), next(tuple(c.inputs.shape) for c in unclear if c.weight == w))
        return set()
    grown = {c.weight for c in again
             if c.kind == "embed" and tuple(c.inputs.shape[:1]) == (examples + 1,)}
    return {c.weight for c in unclear if c.weight not in grown}


def _warn(name: str, shape: tuple) -> None:
    warnings.warn(
        f"embedding {name!r} is called on ids of shape {shape}, one example's shape, with "
        f"{shape[0]} = the batch size, and the loss could not be traced on one more example to "
        "tell position ids the batch shares (arange(T), no per-example K-FAC rows) from "
        "per-example ids; the layer stays on K-FAC. If they are positions, give them the "
        "batch's axis (arange(T)[None]) or leave the layer out of layers=",
        UserWarning, stacklevel=user_stacklevel())
