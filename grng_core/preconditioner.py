"""(F + λI)⁻¹ v with the chosen structure, for RENG and RING (ALGORITHMS.md §2).

`kfac` covers the registered layers and uses `diagonal` for every other leaf; `diagonal`
covers all leaves; `woodbury` uses the current batch's per-example gradients.
"""

from __future__ import annotations

from grng_core.context import select
from grng_core.structures import diagonal, kfac, woodbury


def init(opt, leaves, container, layers, xp, sdtype, dev) -> dict:
    structure = opt.hyperparams["structure"]
    if structure == "woodbury":
        return {}
    resolved = _layers(structure, layers, container, leaves)
    rest = [i for i in range(len(leaves)) if i not in kfac.covered(resolved)]
    state = {"diag": diagonal.init(rest, leaves, xp, sdtype, dev)}
    if structure == "kfac":
        state["kfac"] = kfac.init(resolved, xp, sdtype, dev)
    return state


def _layers(structure, layers, container, leaves):
    if structure != "kfac":
        return []
    if layers is None:
        raise ValueError(
            "structure 'kfac' needs the layer layout at init: "
            "opt.init(params, layers=[gc.LayerSpec(weight=key, bias=key_or_None), ...])"
        )
    return kfac.resolve(layers, container, leaves)


def update_and_solve(env, state, vectors) -> tuple[list, dict]:
    """Refresh the curvature on curvature/inverse steps, then (F + λI)⁻¹ vectors."""
    h, ctx, xp = env.h, env.ctx, env.ctx.xp
    structure = h["structure"]
    if structure == "woodbury":
        return woodbury.solve(woodbury.jacobian_rows(env.per_example, ctx), vectors,
                              env.damping, ctx), {}
    beta = h["ema_decay"]
    new = dict(state)
    if ctx.curvature is not False:
        diag_new = diagonal.update(state["diag"], env.g, env.per_example, beta, ctx)
        new["diag"] = {k: select(ctx.curvature, v, state["diag"][k], xp)
                       for k, v in diag_new.items()}
    out = diagonal.solve(new["diag"], vectors, env.damping, beta, env.curvature_count, ctx)
    if structure == "kfac":
        fk = state["kfac"]
        layers = kfac.from_state(fk, env.params)
        if ctx.curvature is not False:
            stats = kfac.match_stats(layers, env.stats.layers, env.container)
            fk = kfac.update_factors(fk, layers, stats, beta, ctx)
        if ctx.inverse is not False:
            fk = kfac.refresh_inverses(fk, layers, env.damping, ctx, env.container.keys)
        new["kfac"] = fk
        out.update(kfac.precondition(fk, layers, vectors, xp))
    return [out[i] for i in range(len(vectors))], new
