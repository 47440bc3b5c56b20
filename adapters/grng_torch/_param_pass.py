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
        self._task: tuple = (None, True)  # (graph task, `reaches` in it)

    def counts(self, layers) -> bool:
        """Judged on the first trainable leaf of `layers` (indices): inside `backward()`,
        whether it fills that leaf's gradient; inside `torch.autograd.grad`, where torch
        cannot tell, only the optimizer's own (a `torch.autograd.grad` of the loss by hand
        is not collected either: the step then says to call `backward()`)."""
        for i in layers:
            for p in (self.layers[i].weight, self.layers[i].bias):
                if p is not None and p.requires_grad and p.is_leaf:
                    node = self._node(p)
                    fills = None if node is None else fills_grad(node)
                    return self.own_grad if fills is None else fills
        return True

    def _node(self, p):
        """p's gradient accumulator, looked up once (4 µs) and kept, so it stays the one
        autograd uses; None inside a torch.func transform (then the pass is not counted,
        as inside torch.autograd.grad)."""
        node = self._nodes.get(id(p))
        if node is None or node.variable is not p:
            try:
                node = self._nodes[id(p)] = torch.autograd.graph.get_gradient_edge(p).node
            except (AttributeError, RuntimeError):  # inside a torch.func transform: no node
                return None
        return node

    def reaches(self, params) -> bool:
        """Whether the running backward fills the gradient of any of `params` (the model's:
        a model call's outputs reached count for the batch, also when the loss reaches only
        another optimizer's parameters; not an input-gradient pass), once per backward (its
        graph task)."""
        current = getattr(torch._C, "_current_graph_task_id", None)
        task = current() if current is not None else None
        if task is None or self._task[0] != task:
            self._task = (task, self._fills_any(params))
        return self._task[1]

    def _fills_any(self, params) -> bool:
        trainable = [p for p in params if p.requires_grad and p.is_leaf]
        for p in trainable:
            node = self._node(p)
            fills = None if node is None else fills_grad(node)
            if fills is None:  # inside torch.autograd.grad
                return self.own_grad
            if fills:
                return True
        return not trainable

    @contextlib.contextmanager
    def own(self) -> Iterator[None]:
        """The optimizer's own `torch.autograd.grad` of the loss runs inside."""
        old, self.own_grad = self.own_grad, True
        try:
            yield
        finally:
            self.own_grad = old
