"""Diagonal curvature: one number per parameter (ALGORITHMS.md §2.2).

v ← βv + (1−β) q, q = mean over the batch of squared per-example gradients (g ⊙ g without
them); solve(x) = x / (v / (1 − βᵗ) + λ), t the number of curvature updates so far.
"""

from __future__ import annotations


def second_moment(i, grads, per_example, ctx):
    """q for leaf i: mean of squared per-example gradients, else g ⊙ g; replica-averaged."""
    xp = ctx.xp
    if per_example is not None:
        J = xp.astype(per_example[i], ctx.sdtype, copy=False)
        q = xp.mean(J * J, axis=0)
    else:
        q = grads[i] * grads[i]
    return ctx.mean(q)


def init(positions, leaves, xp, sdtype, device) -> dict:
    return {str(i): xp.zeros(leaves[i].shape, dtype=sdtype, device=device) for i in positions}


def update(state, grads, per_example, beta, ctx) -> dict:
    return {k: beta * v + (1.0 - beta) * second_moment(int(k), grads, per_example, ctx)
            for k, v in state.items()}


def solve(state, vectors, damping, beta, count, ctx) -> dict:
    """{position: x / (v / (1 − β^count) + λ)}."""
    correction = 1.0 - beta ** ctx.xp.astype(count, ctx.sdtype, copy=False)
    return {int(k): vectors[int(k)] / (v / correction + damping) for k, v in state.items()}
