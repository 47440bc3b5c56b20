"""(F + λI)⁻¹ v with the chosen structure, for RENG and RING (ALGORITHMS.md §2).

`kfac` covers the registered layers and uses `diagonal` for every other leaf; `diagonal`
covers all leaves; `woodbury` uses the current batch's per-example gradients (no state).
"""

from __future__ import annotations

from grng_core.state import Preconditioner
from grng_core.structures import diagonal, kfac, woodbury


def init(config, layouts, leaves, xp, sdtype, dev) -> Preconditioner:
    """Zero second moments / factors; `layouts` are the resolved K-FAC layers (kfac only)."""
    if config.structure == "woodbury":
        return Preconditioner(diagonal=None, kfac=None)
    covered = kfac.covered(layouts)
    diag = diagonal.init(covered, leaves, 0.0, xp, sdtype, dev)
    layers = kfac.init(layouts, xp, sdtype, dev) if config.structure == "kfac" else None
    return Preconditioner(diagonal=diag, kfac=layers)


def update_and_solve(env, state: Preconditioner, vectors) -> tuple[list, Preconditioner]:
    """Refresh the curvature on curvature/inverse steps, then (F + λI)⁻¹ vectors."""
    h, ctx, xp = env.h, env.ctx, env.ctx.xp
    if h.structure == "woodbury":
        J = woodbury.jacobian_rows(env.per_example, ctx)
        return woodbury.solve(J, vectors, env.damping, ctx), state
    beta = h.ema_decay
    diag = state.diagonal
    if ctx.curvature is not False:
        diag = diagonal.update(diag, env.g, env.per_example, beta, ctx)
    out = diagonal.solve(diag, vectors, env.damping, beta, env.curvature_count, ctx)
    layers = state.kfac
    if layers:
        if ctx.curvature is not False:
            stats = kfac.match_stats(layers, env.stats.layers, env.container)
            layers = kfac.update_factors(layers, stats, beta, ctx)
        if ctx.inverse is not False:
            layers = kfac.refresh_inverses(layers, env.damping, ctx, env.container.keys)
        out.update(kfac.precondition(layers, vectors, xp))
    return [out[i] for i in range(len(vectors))], Preconditioner(diagonal=diag, kfac=layers)
