"""Diagonal curvature: one number per parameter (ALGORITHMS.md §2.2).

v ← βv + (1−β) q, q = mean over the batch of squared per-example gradients (g ⊙ g without
them); solve(x) = x / (v / (1 − βᵗ) + λ), t the number of curvature updates so far.
The state is one array per params leaf, None where another structure (K-FAC) covers it.
"""

from __future__ import annotations

from grng_core.context import select


def second_moment(i, grads, per_example, ctx):
    """q for leaf i: mean of squared per-example gradients, else g ⊙ g; replica-averaged."""
    xp = ctx.xp
    if per_example is not None:
        J = xp.astype(per_example[i], ctx.sdtype, copy=False)
        q = xp.mean(J * J, axis=0)
    else:
        q = grads[i] * grads[i]
    return ctx.mean(q)


def init(covered, leaves, fill, xp, sdtype, device) -> tuple:
    """`fill` (0 for v, σ₀² for R-Kalman's p) for every leaf not in `covered`, else None."""
    return tuple(None if i in covered else xp.full(x.shape, fill, dtype=sdtype, device=device)
                 for i, x in enumerate(leaves))


def positions(state) -> list[int]:
    """The leaves the diagonal covers."""
    return [i for i, v in enumerate(state) if v is not None]


def update(state, grads, per_example, beta, ctx) -> tuple:
    """v ← βv + (1−β)q, selected on curvature steps."""
    return tuple(None if v is None else
                 select(ctx.curvature,
                        beta * v + (1.0 - beta) * second_moment(i, grads, per_example, ctx),
                        v, ctx.xp)
                 for i, v in enumerate(state))


def solve(state, vectors, damping, beta, count, ctx) -> dict:
    """{position: x / (v / (1 − β^count) + λ)}."""
    if all(v is None for v in state):  # K-FAC covers every leaf
        return {}
    correction = 1.0 - beta ** ctx.xp.astype(count, ctx.sdtype, copy=False)
    return {i: vectors[i] / (v / correction + damping) for i, v in enumerate(state)
            if v is not None}
