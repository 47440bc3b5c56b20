"""Keeping the gradient's graph for double backprop, with an ordinary closure.

While the optimizer runs the closure under `GraphBackward`, the closure's `loss.backward()`
becomes `torch.autograd.grad(loss, params, create_graph=True)`: the gradients are written to
`p.grad` (detached, accumulated as backward would) and the graph-carrying gradients are kept
by the mode, so the optimizer can take Hessian-vector products `autograd.grad(g, params, v)`.
No `.grad` ever holds a graph (the leak of `backward(create_graph=True)`), and the graph is
freed when the optimizer drops the mode at the end of the step.

It is a `TorchFunctionMode` that intercepts only `Tensor.backward`; every other call passes
through unchanged. With `real_backward=True` (DistributedDataParallel) the ordinary backward
also runs, with the graph retained, so DDP's gradient averaging happens as usual.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


class GraphBackward(TorchFunctionMode):
    def __init__(self, params: list[torch.Tensor], real_backward: bool = False,
                 quiet=contextlib.nullcontext, own=contextlib.nullcontext):
        super().__init__()
        self.own = own  # entered around the autograd.grad that replaces backward (statistics)
        self.params = params
        self.real_backward = real_backward
        self.quiet = quiet  # entered around the real backward (no statistics twice)
        self.grads: list[torch.Tensor | None] | None = None
        self._kept: dict[int, tuple | None] = {}  # param -> its .grad as the last backward left it
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.Tensor.backward:
            return func(*args, **kwargs)
        tensor = args[0]
        gradient = args[1] if len(args) > 1 else kwargs.get("gradient")
        inputs = kwargs.get("inputs", args[4] if len(args) > 4 else None)
        if inputs is not None:  # a probe of other tensors' gradients (an FGSM step's x)
            mine = {id(p) for p in self.params}
            chosen = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
            if any(id(x) in mine for x in chosen):
                raise RuntimeError(
                    "backward(inputs=...) with the optimizer's parameters inside its closure is "
                    "not supported with gr='double_backprop': call loss.backward(), or use "
                    "gr='finite_difference'")
            return torch.autograd.backward(tensor, gradient, inputs=chosen,
                                           retain_graph=kwargs.get("retain_graph"))
        idx = [i for i, p in enumerate(self.params) if p.requires_grad]
        others = other_leaves(tensor, {id(self.params[i]) for i in idx})
        with self.own():
            got = torch.autograd.grad(tensor, [self.params[i] for i in idx] + others,
                                      grad_outputs=gradient, create_graph=True,
                                      allow_unused=True)
        for x, g in zip(others, got[len(idx):]):  # backward fills them too (x.grad)
            if g is not None:
                x.grad = g.detach() if x.grad is None else x.grad + g.detach()
        if self.grads is None:
            self.grads = [None] * len(self.params)
        grads = self.grads
        for i, g in zip(idx, got):
            if g is None:
                continue
            p = self.params[i]
            # .grad cleared or edited since the last backward (a probe's, then zero_grad):
            # the graph-carrying gradient restarts with it
            prev = grads[i] if self._kept.get(i) == _identity(p.grad) else None
            grads[i] = g if prev is None else prev + g
            if not self.real_backward:
                p.grad = g.detach() if p.grad is None else p.grad + g.detach()
        if self.real_backward:
            with self.quiet():
                torch.autograd.backward(tensor, gradient, retain_graph=True)
        self._kept = {i: _identity(self.params[i].grad) for i in idx}
        self.calls += 1
        return None


def _identity(t) -> tuple | None:
    """A tensor's identity and in-place version (None for None)."""
    return None if t is None else (id(t), t._version)


def other_leaves(tensor: torch.Tensor, params: set) -> list:
    """The leaf tensors other than `params` (ids) that `tensor.backward()` would fill the
    gradient of (an input with requires_grad: an FGSM step reads x.grad), found from the
    graph's gradient accumulators."""
    out, seen, todo = [], set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) not in params:
                out.append(var)
            continue
        todo.extend(f for f, _ in node.next_functions)
    return out


def double_backward_error(title: str, hvp: bool, e: RuntimeError) -> RuntimeError | None:
    """What a torch error of differentiating the gradient again means for an optimizer whose
    step does (`hvp`: RENG's gr='double_backprop'), or None."""
    if hvp and "use_reentrant=True" in str(e):
        return RuntimeError(
            f"{title} with gr='double_backprop' differentiates the gradient again, which "
            "torch.utils.checkpoint with use_reentrant=True refuses (nothing was changed): "
            "checkpoint with use_reentrant=False (transformers: model.gradient_checkpointing"
            "_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), or use "
            "gr='finite_difference'")
    if hvp and "double backward" in str(e):
        return RuntimeError(
            f"{title} with gr='double_backprop' needs a double backward through the model, "
            "which this model cannot give (torch.compile's aot_autograd does not support "
            "it): use gr='finite_difference' with a compiled model, or leave the model "
            "uncompiled")
    if hvp and "the derivative for" in str(e) and "not implemented" in str(e):
        return RuntimeError(
            f"{title} with gr='double_backprop' differentiates the gradient again, and torch "
            f"has no such derivative for an operation of this model ({e}; nothing was "
            "changed): use gr='finite_difference'")
    return None
