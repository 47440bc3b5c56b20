"""(F + λI)⁻¹ v with the chosen structure, for RENG and RING (ALGORITHMS.md §2).

`kfac` covers the registered layers and uses `diagonal` for every other leaf; `diagonal`
covers all leaves; `woodbury` uses the current batch's per-example gradients (no state).
"""

from __future__ import annotations

from grng_core import schedule
from grng_core.config import per_step_damping
from grng_core.linalg import resolve_method
from grng_core.requirements import factored_applies, fd_rows_apply
from grng_core.state import Preconditioner
from grng_core.structures import diagonal, kfac, kfac_eigen, woodbury


def init(config, layouts, leaves, xp, sdtype, dev) -> Preconditioner:
    """Zero second moments / factors; `layouts` are the resolved K-FAC layers (kfac only).
    A per-step damping solved by "eigh" keeps eigendecompositions instead of inverses."""
    if config.structure == "woodbury":
        return Preconditioner(diagonal=None, kfac=None)
    covered = kfac.covered(layouts)
    diag = diagonal.init(covered, leaves, 0.0, xp, sdtype, dev)
    layers = None
    if config.structure == "kfac":
        # eigenbases where the damping changes between decompositions (inverse_every > 1);
        # refreshed every step, "auto" factors the damped matrices themselves (cheaper)
        reused = per_step_damping(config) and config.inverse_every > 1
        eigen = per_step_damping(config) and resolve_method(config.inverse_method, xp,
                                                            reused) == "eigh"
        layers = kfac.init(layouts, xp, sdtype, dev, eigen=eigen)
    return Preconditioner(diagonal=diag, kfac=layers)


def update_and_solve(env, state: Preconditioner, vectors, damping=None,
                     passes=None) -> tuple[list, Preconditioner]:
    """Refresh the curvature on curvature/inverse steps, then (F + cI)⁻¹ vectors, c the
    damping λ unless given (RING's c_t, §3.2: then K-FAC's inverses follow it every step);
    K-FAC layers in factored form (§2.1) where `vectors` is the batch gradient or a
    combination of passes whose rows are known (`passes`, `vector_rows`)."""
    h, ctx, xp = env.h, env.ctx, env.ctx.xp
    damping = env.damping if damping is None else damping
    if h.structure == "woodbury":
        J = woodbury.jacobian_rows(env.per_example, ctx)
        return woodbury.solve(J, vectors, damping, ctx), state
    beta = h.ema_decay
    diag = state.diagonal
    if ctx.curvature is not False:
        diag = diagonal.update(diag, env.g, env.per_example, beta, ctx)
    out = diagonal.solve(diag, vectors, damping, beta, env.curvature_count, ctx)
    layers = state.kfac
    if layers:
        batch_rows = layer_rows(env, layers)
        flags = layer_flags(env, layers, batch_rows)
        if ctx.curvature is not False:
            layers = kfac.update_factors(layers, batch_rows, beta, ctx, flags)
        use = vector_rows(env, layers, batch_rows, vectors, passes)
        keys = env.container.keys
        which = [inverse for _, inverse in flags]
        if layers[0].S_vecs is not None:  # eigenbases: exact for this step's damping
            if ctx.inverse is not False:
                layers = kfac_eigen.decompose(layers, ctx, keys, which)
            out.update(kfac_eigen.precondition(layers, vectors, damping, xp, use))
        else:
            if per_step_damping(h):
                which = [True] * len(layers)
            if any(inverse is not False for inverse in which):
                layers = kfac.refresh_inverses(layers, damping, ctx, keys, which)
            out.update(kfac.precondition(layers, vectors, xp, use))
    return [out[i] for i in range(len(vectors))], Preconditioner(diagonal=diag, kfac=layers)


def layer_rows(env, layers) -> list | None:
    """This step's K-FAC rows: required on curvature steps, used when given on the others."""
    only_precondition = env.ctx.curvature is False
    if only_precondition and env.stats.layers is None:
        return None
    # on a warm-up step the adapter may leave out the layers that skip the warm-up
    partial = only_precondition or (env.ctx.steady is not None and env.ctx.steady[0] is False)
    stats = kfac.match_stats(layers, env.stats.layers, env.container, partial,
                             env.stats.absent)
    return kfac.all_rows(layers, stats, env.ctx)


def vector_rows(env, layers, batch_rows, vectors, passes) -> list:
    """Per K-FAC layer, rows whose product `vectors` is, where the factored form is cheaper
    for their shapes (§2.1), else None: the batch's own for the batch gradient g
    (`factored_applies`); for a finite-difference ĝ = Σ cᵢ gᵢ (`estimators.Regularized`),
    every pass's rows, its a rows times cᵢ, stacked (`fd_rows_apply`)."""
    h, ctx = env.h, env.ctx
    if passes is None:
        own = vectors is env.g and factored_applies(h)
        return kfac.factored_rows(layers, batch_rows if own else None, ctx)
    if batch_rows is None or not fd_rows_apply(h):
        return [None] * len(layers)
    matched = [None if st is None else kfac.match_stats(layers, st.layers, env.container,
                                                         partial=True) for _, st in passes]
    return kfac.stacked_rows(layers, batch_rows, matched, [c for c, _ in passes], ctx)


def layer_flags(env, layers, batch_rows) -> list:
    """(curvature, inverse) of each K-FAC layer on this step (`schedule.layer_flags`: the
    per-layer warm-up, §2.1)."""
    ctx = env.ctx
    flags = schedule.layer_flags(env.h, (ctx.curvature, ctx.inverse), ctx.steady,
                                 [layer.layout for layer in layers], batch_rows, ctx.replicas)
    if env.stats.absent and batch_rows is not None:  # layers that took no part: factors kept
        flags = [(False, inv) if r is None else (curv, inv)
                 for (curv, inv), r in zip(flags, batch_rows)]
    return flags
