"""What a param group's core optimizer needs from the torch side, checked when it is built."""

from __future__ import annotations

import functools

import grng_core as gc
from grng_torch._functional import LossModule


def check_needs(opt, core: gc.Optimizer, i: int) -> None:
    """ValueError naming the missing argument (model=, loss_fn=, sample_targets=)."""
    title = type(opt).__name__
    r, structure = core.requirements, core.config.structure
    if r.layer_stats and opt.model is None:
        raise ValueError(
            f"{title} with structure={structure!r} (param group {i}) needs to see the "
            f"model's layers: {title}(model.parameters(), model=model, ...) or "
            f"{title}(model, ...)")
    if r.per_example_grads and (opt.model is None or opt.loss_fn is None):
        raise ValueError(
            f"{title} with structure={structure!r} (param group {i}) needs per-example "
            "gradients: pass model= and loss_fn= (the loss module the closure calls)")
    if r.per_example_grads and opt.batch_axis != 0:
        raise ValueError(
            f"{title} with structure={structure!r} (param group {i}) needs per-example "
            f"gradients, which slice the model's inputs on axis 0, but batch_axis="
            f"{opt.batch_axis}: call the model batch-first (batch_axis=0), or use "
            "structure='kfac'")
    if r.fisher == "mc" and (r.layer_stats or r.per_example_grads):
        if opt.model is None or opt.loss_fn is None:
            raise ValueError(f"{title} with fisher='mc' (param group {i}) needs model= and "
                             "loss_fn= to run the sampled-label pass")
        if opt.sample_targets is None:
            raise ValueError(
                f"{title} with fisher='mc' needs sample_targets=fn(output) -> targets: no "
                f"default sampler for loss {type(opt.loss_fn).__name__}")
    if (r.per_example_grads or r.fisher == "mc") and opt.loss_fn is not None:  # its passes
        reduction = loss_reduction(opt.loss_fn)
        if reduction != "mean":
            raise ValueError(f"loss_fn must average over the batch (reduction='mean'), got "
                             f"reduction={reduction!r}")


def check_loss_reduction(loss_fn) -> None:
    """Any configuration: a `loss_fn` that sums over the batch is refused (the K-FAC
    statistics take the loss to be the batch mean; the passes above need exactly "mean")."""
    if loss_reduction(loss_fn) == "sum":
        raise ValueError(
            f"loss_fn={loss_fn!r} sums over the batch: the K-FAC statistics take the "
            "loss to be the batch mean (each example's output gradient is B times its "
            "share of it), so a summed loss makes the factors B² too large and the steps "
            "about B times smaller. Use reduction='mean' (the default), in the closure "
            "too")


def loss_reduction(loss_fn) -> str:
    """A loss's batch reduction: a loss module's `reduction`, or the `reduction=` keyword of a
    `functools.partial` (``partial(F.cross_entropy, reduction="sum")``); "mean" otherwise
    (the functional losses' default). A function wrapped as a `LossModule` is looked into."""
    loss_fn = getattr(loss_fn, "fn", loss_fn) if isinstance(loss_fn, LossModule) else loss_fn
    while isinstance(loss_fn, functools.partial):
        if "reduction" in loss_fn.keywords:
            return str(loss_fn.keywords["reduction"])
        loss_fn = loss_fn.func
    return str(getattr(loss_fn, "reduction", "mean"))
