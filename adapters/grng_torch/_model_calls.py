"""The model calls a step collects (`Batch` of `Call`s: one per micro-batch of the closure, or
per forward since the previous closure-free step), kept so the optimizer can re-run the model
(per-example gradients, the "mc" Fisher's sampled-label pass) and count the batch's examples
(E, ALGORITHMS.md §2.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Call:
    """One call of the model in the closure (one micro-batch), and its loss module call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    size: int | None = None  # the first tensor argument's batch axis (`batch_axis`)
    example: tuple | None = None  # that tensor's shape without the batch axis: one example's
    autocast: tuple = ()  # ((device_type, enabled, dtype), ...) at the forward call
    targets: Any = None
    has_targets: bool = False
    loss_input_shape: tuple | None = None  # the loss module's input (output_fn's result)


@dataclass
class Batch:
    """The model calls of the optimizer's closure (several when it accumulates micro-batches)."""

    calls: list[Call] = field(default_factory=list)

    @property
    def called(self) -> bool:
        return bool(self.calls)

    @property
    def size(self) -> int | None:
        """E: the examples of every call (None when a call's batch size is unknown)."""
        sizes = [c.size for c in self.calls]
        return None if not sizes or None in sizes else sum(sizes)  # type: ignore[arg-type]


def first_tensor(tree) -> torch.Tensor | None:
    """The first tensor among a call's arguments (args, kwargs)."""
    args = tree[0] if isinstance(tree, tuple) and tree else ()
    if args and isinstance(args[0], torch.Tensor):
        return args[0]  # the usual model(x, ...) call: no tree walk
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None
