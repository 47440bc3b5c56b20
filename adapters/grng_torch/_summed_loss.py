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
#: nodes searched below a summing node for the model's output (a loss module's few ops)
REACH = 64


def _summing_nodes(loss, batch: int, axis: int):
    """The nodes at the top of the loss (through the terms added to it) that sum: a built-in
    loss with reduction='sum' (its backward node saves the reduction) or a `.sum()` of a
    tensor with the batch on `axis`. Anything scaled afterwards (a division by the batch size,
    a GradScaler's factor) is not followed, so it never counts."""
    stack = [getattr(loss, "grad_fn", None)]
    for _ in range(LOOK):
        if not stack:
            return
        node = stack.pop()
        if node is None:
            continue
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if getattr(node, "_saved_reduction", None) == SUM or (
                type(node).__name__ == "SumBackward0" and sizes and len(sizes) > axis
                and int(sizes[axis]) == batch):
            yield node
        elif type(node).__name__ in ("AddBackward0", "SubBackward0"):
            stack.extend(f for f, _ in node.next_functions)


def _reaches(node, targets: set) -> bool:
    """Whether the graph below `node` holds one of `targets` (ids of the model outputs'
    nodes) within `REACH` nodes: the sum is over the model's output, not, say, a penalty on
    the parameters (an L2-SP term, mse_loss(w, w0, reduction='sum'))."""
    stack, seen = [node], set[int]()
    while stack and len(seen) < REACH:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        if id(n) in targets:
            return True
        seen.add(id(n))
        stack.extend(f for f, _ in n.next_functions)
    return False


def sums_over_batch(loss, outputs, batch: int, axis: int) -> bool:
    """The loss sums the model's output over the batch: a summing node at its top
    (`_summing_nodes`) whose graph reaches one of the model call's `outputs` (autograd
    nodes)."""
    targets = {id(n) for n in outputs}
    return any(_reaches(node, targets) for node in _summing_nodes(loss, batch, axis))


def warn_if_summed(opt, loss, first: list[bool]) -> None:
    """Once per optimizer: the closure loss of a step that is some group's first (`first`,
    per group) sums the model's output over a batch of more than one (needs `model=`: its
    calls give the batch size and the outputs)."""
    coll = opt.collector
    if opt.checked_loss or not any(first) or coll is None:
        return
    opt.checked_loss, coll.keep_outputs = True, False  # a closure-free first step: no loss
    size = coll.batch.size
    if loss is None:
        return
    outputs = [n for call in coll.batch.calls for n in call.outputs]
    if size is None or size == 1 or not sums_over_batch(loss, outputs, size, opt.batch_axis):
        return
    b = f"B = {size}"
    warnings.warn(
        f"{type(opt).__name__}: the closure's loss is a sum over the batch (reduction='sum' or "
        f".sum()): GRNG's curvature takes the loss to be the batch mean, so a summed loss "
        f"makes the steps about {b} times shorter (the gradient is {b} times the mean's, the "
        "curvature its square). Average over the examples (reduction='mean', or divide the "
        "sum by the batch size); a sum over each example's own terms (tokens, pixels) before "
        "the mean over examples is fine", UserWarning, stacklevel=user_stacklevel())
