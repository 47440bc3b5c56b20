"""The update tail every optimizer ends with (ALGORITHMS.md §3).

1. trust region (K-FAC's KL clip): ν = min(1, √(κ / (η² |⟨d, ĝ⟩|))), d ← νd;
2. momentum: m ← μm + d;
3. θ ← θ − η m − η ω θ  (returned as the update −η m − η ω θ, in the parameter's dtype).
"""

from __future__ import annotations


def kl_clip(d, ghat, lr, kappa, xp):
    """d scaled by ν = min(1, √(κ / (η²|⟨d, ĝ⟩|))); ⟨d, ĝ⟩ = 0 gives ν = 1."""
    inner = xp.abs(sum(xp.sum(a * b) for a, b in zip(d, ghat)))
    quad = (lr * lr) * inner
    positive = quad > 0
    nu = xp.sqrt(kappa / xp.where(positive, quad, xp.ones_like(quad)))
    nu = xp.where(positive, xp.minimum(nu, xp.ones_like(nu)), xp.ones_like(nu))
    return [nu * x for x in d]


def momentum(m, d, mu):
    """m ← μm + d."""
    return [mu * mi + di for mi, di in zip(m, d)]


def updates(direction, params, lr, weight_decay, xp, sdtype):
    """−η m − η ω θ, cast back to each parameter's dtype."""
    out = []
    for m, p in zip(direction, params):
        u = -lr * m
        if weight_decay:
            u = u - (lr * weight_decay) * xp.astype(p, sdtype, copy=False)
        out.append(xp.astype(u, p.dtype, copy=False))
    return out
