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


def per_example_grads(root: nn.Module, names: list[str], args: tuple, kwargs: dict,
                      targets, size: int, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)}: the gradients of the per-example losses w.r.t. the named params."""
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
        out = torch.func.functional_call(
            root, ({**rest, **sub}, buffers), _one(a, arg_dims), _one(kw, kwarg_dims),
            tie_weights=True, strict=False)
        return loss_fn(out, _one(y, target_dims))

    fn = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, arg_dims, kwarg_dims,
                                                             target_dims),
                         randomness="different")
    try:
        grads = fn(wanted, args, kwargs, targets)
    except RuntimeError as e:
        if "batch_norm" in str(e).lower() or "batchnorm" in str(e).lower():
            raise RuntimeError(
                "per-example gradients (structure='woodbury', R-Kalman) cannot run a model with "
                "BatchNorm in training mode through torch.func.vmap; use GroupNorm/LayerNorm, "
                "eval-mode BatchNorm or structure='kfac'/'diagonal'") from e
        raise
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
