"""Woodbury: the minibatch's exact empirical Fisher F = JᵀJ/B (ALGORITHMS.md §2.3).

solve(v) = (1/λ) [v − Jᵀ (λB·I_B + J Jᵀ)⁻¹ J v], with J the per-example gradients over all
leaves (kept per leaf: J Jᵀ = Σ_l J_l J_lᵀ, never concatenated). Only a B × B system is solved.
"""

from __future__ import annotations

from grng_core.linalg import small_spd_inverse


def jacobian_rows(per_example, ctx) -> list:
    """Per-leaf J_l of shape (B, N_l) in the state dtype, gathered over replicas."""
    xp = ctx.xp
    if per_example is None:
        raise ValueError("structure 'woodbury' needs stats.per_example_grads on every step")
    return [ctx.gather(xp.reshape(xp.astype(J, ctx.sdtype, copy=False), (J.shape[0], -1)))
            for J in per_example]


def gram(J, ctx):
    """Σ_l J_l J_lᵀ (B × B)."""
    xp = ctx.xp
    return sum(Jl @ xp.matrix_transpose(Jl) for Jl in J)


def apply_J(J, vectors, ctx):
    """J v = Σ_l J_l v_l (B,)."""
    xp = ctx.xp
    return sum(Jl @ xp.reshape(v, (-1,)) for Jl, v in zip(J, vectors))


def apply_Jt(J, c, shapes, ctx) -> list:
    """Jᵀ c, per leaf."""
    xp = ctx.xp
    return [xp.reshape(c @ Jl, shape) for Jl, shape in zip(J, shapes)]


def solve(J, vectors, damping, ctx) -> list:
    """(F + λI)⁻¹ v for F = JᵀJ/B (§2.3)."""
    xp = ctx.xp
    B = J[0].shape[0]
    eye = xp.eye(B, dtype=ctx.sdtype, device=ctx.device)
    K = (damping * B) * eye + gram(J, ctx)
    log = ctx.incidents  # a numerically singular system: extra damping, counted
    K_inv = small_spd_inverse(K, xp, tol=ctx.tol, max_iter=ctx.max_iter, strict=False,
                              rescue=None if log is None else log.rescue(
                                  -1, "B x B system", "woodbury"))
    c = K_inv @ apply_J(J, vectors, ctx)
    JTc = apply_Jt(J, c, [tuple(v.shape) for v in vectors], ctx)
    return [(v - w) / damping for v, w in zip(vectors, JTc)]
