"""Per-example gradients through torch.func, and targets sampled from the model ("mc" Fisher).

`per_example_grads` re-runs the model functionally (`torch.func.functional_call`) on one
example at a time, vectorised with `torch.func.vmap` over `torch.func.grad` of the loss:
row i of each result is the gradient of l_i = loss_fn(model(x_i), y_i), whose mean over the
batch is the batch gradient when the loss module averages over the batch.

`default_sampler(loss_fn)` draws targets from the predictive distribution the loss is the
negative log-likelihood of, for torch's common losses (CrossEntropyLoss, NLLLoss,
BCEWithLogitsLoss, MSELoss); any other loss needs `sample_targets=` on the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree


def _batched(tree, size: int):
    """vmap in_dims for `tree`: 0 for tensors with leading axis `size`, None otherwise."""
    return pytree.tree_map(
        lambda x: 0 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size
        else None, tree)


def _one(tree, dims):
    """Give the batched leaves of one example back their batch axis (of length 1)."""
    return pytree.tree_map(lambda x, d: x.unsqueeze(0) if d == 0 else x, tree, dims)


def default_output(out):
    """The tensor the loss is computed from: the output itself, a `ModelOutput`'s or dict's
    `logits`, or the first element of a tuple / list (Hugging Face's conventions)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model returned {type(out).__name__}, not a tensor, and it has no 'logits': pass "
        "output_fn=lambda out: <the tensor your loss_fn takes> to the optimizer")


def loss_view(loss_shape: tuple | None, size: int) -> tuple | None:
    """One example's loss-input shape when the closure reshaped the output before the loss
    (nanoGPT's logits.view(-1, V): (B·T, V) -> (T, V)); None when its first axis is B."""
    if loss_shape is None or not loss_shape or loss_shape[0] == size:
        return None
    if loss_shape[0] % size:
        raise ValueError(
            f"the loss module's input has shape {loss_shape}, whose first axis is not a "
            f"multiple of the batch size {size}: per-example losses cannot be formed; pass "
            "output_fn= and call loss_fn on the model output's (B, ...) layout")
    return (loss_shape[0] // size, *loss_shape[1:])


def check_batchnorm(root: nn.Module) -> None:
    """Per-example gradients cannot run BatchNorm in training mode (a batch of one example
    has no batch statistics; torch.func refuses its in-place running-stat update)."""
    bn = [n or type(m).__name__ for n, m in root.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bn:
        raise RuntimeError(
            f"per-example gradients (structure='woodbury', or 'diagonal' with fisher='mc') "
            f"cannot run BatchNorm in training mode (modules {bn[:5]}): use structure='kfac' "
            "(it needs no per-example gradients), GroupNorm/LayerNorm, or BatchNorm in eval "
            "mode")


def per_example_grads(root: nn.Module, names: list[str], args: tuple, kwargs: dict,
                      targets, size: int, loss_fn: Callable, output_fn: Callable = default_output,
                      loss_shape: tuple | None = None) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)}: the gradients of the per-example losses w.r.t. the named params.
    `loss_shape`: the loss module's input shape at the closure's call (see `loss_view`)."""
    check_batchnorm(root)
    view = loss_view(loss_shape, size)
    if view is not None and isinstance(targets, torch.Tensor):
        targets = targets.reshape(size, view[0], *targets.shape[1:])
    params = {k: p.detach() for k, p in root.named_parameters()}
    buffers = {k: b.detach() for k, b in root.named_buffers()}
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"parameters {missing} are not in the model given to the optimizer")
    wanted = {n: params[n] for n in names}
    rest = {k: v for k, v in params.items() if k not in wanted}
    arg_dims, kwarg_dims, target_dims = _batched(args, size), _batched(kwargs, size), \
        _batched(targets, size)

    def loss_one(sub, a, kw, y):
        out = output_fn(torch.func.functional_call(
            root, ({**rest, **sub}, buffers), _one(a, arg_dims), _one(kw, kwarg_dims),
            tie_weights=True, strict=False))
        if view is not None:
            return loss_fn(out.reshape(view), y)
        return loss_fn(out, _one(y, target_dims))

    fn = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, arg_dims, kwarg_dims,
                                                             target_dims),
                         randomness="different")
    grads = fn(wanted, args, kwargs, targets)
    return {k: v.detach() for k, v in grads.items()}


# ------------------------------------------------------------------ sampling
def _categorical(logits: torch.Tensor) -> torch.Tensor:
    """Labels ~ Categorical(softmax(logits)) over axis 1 (torch's class axis)."""
    moved = logits.detach().float().movedim(1, -1) if logits.dim() > 1 else logits.detach().float()
    return torch.distributions.Categorical(logits=moved).sample()


def _bernoulli(logits: torch.Tensor) -> torch.Tensor:
    return torch.bernoulli(torch.sigmoid(logits.detach().float())).to(logits.dtype)


def _gaussian(out: torch.Tensor) -> torch.Tensor:
    """y = f + σ ε with σ² = D/2: MSELoss's per-example loss ‖y − f‖²/D is the negative
    log-likelihood of N(f, (D/2) I) up to a constant (D values per example)."""
    d = math.prod(out.shape[1:]) if out.dim() > 1 else 1
    o = out.detach()
    return o + math.sqrt(d / 2.0) * torch.randn_like(o)


def default_sampler(loss_fn) -> Callable | None:
    """The target sampler matching a torch loss module, or None when unknown."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return _categorical
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return _bernoulli
    if isinstance(loss_fn, nn.MSELoss):
        return _gaussian
    return None


class LossModule(nn.Module):
    """Wraps a loss function `fn(output, target)` as a module, so its targets can be seen."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, output, target):
        return self.fn(output, target)

    def extra_repr(self) -> str:
        return repr(self.fn)
