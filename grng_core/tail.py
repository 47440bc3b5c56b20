"""The update tail every optimizer ends with (ALGORITHMS.md §3).

1. trust region (K-FAC's KL clip): ν = min(1, √(κ / (η² |⟨d, ĝ⟩|))), d ← νd;
2. momentum: m ← μm + d;
3. θ ← θ − η m − η ω θ  (returned as the update −η m − η ω θ, in the parameter's dtype).
Without momentum m = νd, and ν is applied together with η (one pass over the leaves).
"""

from __future__ import annotations

from grng_core import fused
from grng_core.tree import tree_inner


def kl_term(d, ghat, lr, xp):
    """η²⟨d, ĝ⟩ (a 0-d array): a part's share of the trust region's quadratic (`Whole`)."""
    return (lr * lr) * tree_inner(d, ghat, xp)


def kl_scale(term, kappa, xp):
    """ν = min(1, √(κ / |η²⟨d, ĝ⟩|)) = √(κ / max(|term|, κ)), a 0-d array (term: `kl_term`,
    summed over the parts of a model); ⟨d, ĝ⟩ = 0 gives ν = 1, a non-finite ⟨d, ĝ⟩ a
    non-finite ν (the step is then skipped, §4). κ may be an array (a schedule's value): an
    infinite one (the trust region off at that step) gives ν = 1."""
    if not isinstance(kappa, (int, float)):  # a schedule's value: inf is read as off
        kappa = xp.clip(xp.asarray(kappa, dtype=term.dtype), max=xp.finfo(term.dtype).max)
    return xp.sqrt(kappa / xp.clip(xp.abs(term), min=kappa))



def momentum(m, d, mu, xp, nu=None):
    """m ← μm + νd (ν: the trust region's scale, None for 1)."""
    if nu is None:
        return [mu * mi + di for mi, di in zip(m, d)]
    return [fused.axpby(mu, mi, nu, di, xp) for mi, di in zip(m, d)]


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
