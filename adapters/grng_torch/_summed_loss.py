"""A closure whose loss sums over the batch, read from the loss's autograd graph on a group's
first step and warned once (a `loss_fn=` that sums is refused when the optimizer is built:
`_requirements.check_loss_reduction`). GRNG's curvature takes the loss to be the batch mean
(ALGORITHMS.md §2.1: an example's output-gradient row is B times its share of the loss): with
a sum, the gradient is B times and the curvature B² times the mean's, so the steps are about
B times shorter, the trust region does not undo it (it bounds η²⟨d, ĝ⟩, which a loss scale
leaves alone), and nothing else says so."""

from __future__ import annotations

import warnings

from grng_core.user_frame import user_stacklevel

#: torch's loss reduction enum as the backward nodes save it (none 0, mean 1, sum 2)
SUM = 2
#: nodes looked at from the loss down: the loss's own and those of terms added to it
LOOK = 8


def sums_over_batch(loss, batch: int | None, axis: int) -> bool:
    """The loss sums over the batch: a built-in loss with reduction='sum' (its backward node
    saves the reduction) or, where the batch size is known, a `.sum()` of a tensor with the
    batch on `axis` (not, say, a parameter's squares), alone or added to other terms (a
    regulariser). Anything scaled afterwards (a division by the batch size, a GradScaler's
    factor) is not followed, so it never counts."""
    stack = [getattr(loss, "grad_fn", None)]
    for _ in range(LOOK):
        if not stack:
            break
        node = stack.pop()
        if node is None:
            continue
        if getattr(node, "_saved_reduction", None) == SUM:
            return True
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if (type(node).__name__ == "SumBackward0" and batch is not None and sizes
                and len(sizes) > axis and int(sizes[axis]) == batch):
            return True
        if type(node).__name__ in ("AddBackward0", "SubBackward0"):
            stack.extend(f for f, _ in node.next_functions)
    return False


def warn_if_summed(opt, loss, first: list[bool]) -> None:
    """Once per optimizer: the closure loss of a step that is some group's first (`first`,
    per group) sums over a batch of more than one."""
    if opt.checked_loss or loss is None or not any(first):
        return
    opt.checked_loss = True
    coll = opt.collector
    size = None if coll is None else coll.batch.size
    if size == 1 or not sums_over_batch(loss, size, opt.batch_axis):
        return
    b = "B" if size is None else f"B = {size}"
    warnings.warn(
        f"{type(opt).__name__}: the closure's loss is a sum over the batch (reduction='sum' or "
        f".sum()): GRNG's curvature takes the loss to be the batch mean, so a summed loss "
        f"makes the steps about {b} times shorter (the gradient is {b} times the mean's, the "
        "curvature its square). Average over the examples (reduction='mean', or divide the "
        "sum by the batch size); a sum over each example's own terms (tokens, pixels) before "
        "the mean over examples is fine", UserWarning, stacklevel=user_stacklevel())
