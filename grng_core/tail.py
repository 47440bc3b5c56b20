"""The update tail every optimizer ends with (ALGORITHMS.md §3).

1. trust region (K-FAC's KL clip): ν = min(1, √(κ / (η² |⟨d, ĝ⟩|))), d ← νd;
2. momentum: m ← μm + d;
3. θ ← θ − η m − η ω θ  (returned as the update −η m − η ω θ, in the parameter's dtype).
Without momentum m = νd, and ν is applied together with η (one pass over the leaves).
"""

from __future__ import annotations

from grng_core.tree import tree_inner


def kl_scale(d, ghat, lr, kappa, xp):
    """ν = min(1, √(κ / (η²|⟨d, ĝ⟩|))) = √(κ / max(η²|⟨d, ĝ⟩|, κ)), a 0-d array; ⟨d, ĝ⟩ = 0
    gives ν = 1, a non-finite ⟨d, ĝ⟩ a non-finite ν (the step is then skipped, §4)."""
    quad = (lr * lr) * xp.abs(tree_inner(d, ghat, xp))
    return xp.sqrt(kappa / xp.clip(quad, min=kappa))



def momentum(m, d, mu):
    """m ← μm + d."""
    return [mu * mi + di for mi, di in zip(m, d)]


def updates(direction, params, lr, weight_decay, xp, sdtype, scale=None):
    """−η·scale·m − η ω θ (scale: ν where m = d, else 1), cast back to each parameter's
    dtype."""
    out = []
    step = -lr if scale is None else -lr * scale
    for m, p in zip(direction, params):
        u = step * m
        if weight_decay:
            u = u - (lr * weight_decay) * xp.astype(p, sdtype, copy=False)
        out.append(xp.astype(u, p.dtype, copy=False))
    return out
