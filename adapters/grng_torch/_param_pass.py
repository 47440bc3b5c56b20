"""Which backward passes give a layer's K-FAC rows: the one that fills the parameters'
gradients (the loss's `backward()`, or the optimizer's own `torch.autograd.grad` of it,
`GraphBackward`), not an input gradient the closure takes itself (`torch.autograd.grad(loss,
x)`: FGSM, a gradient penalty, a PINN's derivatives), whose output gradients are no rows of
the step's batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from grng_torch._layer_rows import fills_grad


class ParamPass:
    """Asked from a gradient hook: does the running backward count (`counts`)?"""

    def __init__(self, layers):
        self.layers = layers
        self.own_grad = False  # the optimizer's own torch.autograd.grad of the loss runs
        self._nodes: dict[int, Any] = {}  # id(param) -> its gradient accumulator (kept)
        self._task: tuple = (None, True)  # (graph task, `counts_any` in it)

    def counts(self, layers) -> bool:
        """Judged on the first trainable leaf of `layers` (indices): inside `backward()`,
        whether it fills that leaf's gradient; inside `torch.autograd.grad`, where torch
        cannot tell, only the optimizer's own (a `torch.autograd.grad` of the loss by hand
        is not collected either: the step then says to call `backward()`)."""
        for i in layers:
            for p in (self.layers[i].weight, self.layers[i].bias):
                if p is not None and p.requires_grad and p.is_leaf:
                    fills = fills_grad(self._node(p))
                    return self.own_grad if fills is None else fills
        return True

    def _node(self, p):
        """p's gradient accumulator, looked up once (4 µs) and kept, so it stays the one
        autograd uses."""
        node = self._nodes.get(id(p))
        if node is None or node.variable is not p:
            node = self._nodes[id(p)] = torch.autograd.graph.get_gradient_edge(p).node
        return node

    def counts_any(self, layers) -> bool:
        """Whether the running backward counts for any of `layers` (a model call's outputs
        reached: a layer of it outside this backward's graph, an expert without tokens or an
        unused head, does not decide it; no layers collected, "mc"'s closure: yes), once per
        backward (its graph task)."""
        current = getattr(torch._C, "_current_graph_task_id", None)
        task = current() if current is not None else None
        if task is None or self._task[0] != task:
            self._task = (task, not layers or any(self.counts((i,)) for i in layers))
        return self._task[1]

    @contextlib.contextmanager
    def own(self) -> Iterator[None]:
        """The optimizer's own `torch.autograd.grad` of the loss runs inside."""
        old, self.own_grad = self.own_grad, True
        try:
            yield
        finally:
            self.own_grad = old
