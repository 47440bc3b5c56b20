"""R-Kalman beliefs: a Kalman filter over the parameters (ALGORITHMS.md §3.3).

The filter keeps P (the inverse-Fisher stand-in) directly; no Fisher is ever inverted.
Three beliefs, each returning the direction P⁺ĝ and the carried state:
- `woodbury`: diagonal p with an exact batch correction from per-example gradients J;
- `diagonal`: p⁺ = 1 / (1/p⁻ + (1 − β_K) q);
- `kfac`: P_S ⊗ P_A per layer, predicted by one Newton–Schulz step and corrected by a
  recursive-least-squares (Woodbury) update with the batch rows.
"""

from __future__ import annotations

from grng_core.concrete import concrete_bool
from grng_core.context import select
from grng_core.linalg import frobenius, small_spd_inverse, spd_inverse, symmetrize
from grng_core.state import Belief
from grng_core.structures import diagonal, kfac, woodbury

# p⁺ = p⁻ − p⁻²·diag(JᵀS⁻¹J) is positive in exact arithmetic; round-off must not flip it.
P_FLOOR = 1e-12


def predict(p, beta, prior_var):
    """Fading-memory predict, elementwise: p⁻ = 1 / (β/p + (1 − β)/σ₀²) (§3.3 step 1)."""
    return 1.0 / (beta / p + (1.0 - beta) / prior_var)


def init(config, layouts, leaves, xp, sdtype, device) -> Belief:
    """p = σ₀² for every leaf outside K-FAC layers (at t = 1 the predict keeps it); the
    Kronecker belief of each layer (kfac only)."""
    covered = kfac.covered(layouts)
    diag = diagonal.init(covered, leaves, config.prior_var, xp, sdtype, device)
    layers = (kfac.init(layouts, xp, sdtype, device, traces=True)
              if config.structure == "kfac" else None)
    return Belief(diagonal=diag, kfac=layers)


def diagonal_step(p_state, ghat, grads, per_example, beta, prior_var, ctx):
    """Diagonal belief (§3.3): p⁺ = 1/(1/p⁻ + (1−β)q); direction p⁺ ⊙ ĝ."""
    xp = ctx.xp
    new, out = [], {}
    for i, p in enumerate(p_state):
        if p is not None and ctx.curvature is not False:
            q = diagonal.second_moment(i, grads, per_example, ctx)
            p_plus = 1.0 / (1.0 / predict(p, beta, prior_var) + (1.0 - beta) * q)
            p = select(ctx.curvature, p_plus, p, xp)
        if p is not None:
            out[i] = p * ghat[i]
        new.append(p)
    return out, tuple(new)


def woodbury_step(p_state, ghat, per_example, beta, prior_var, ctx):
    """Diagonal belief with the exact batch correction (§3.3 steps 1–4).

    S = R + J diag(p⁻) Jᵀ, R = (B/(1−β))·I; direction P⁺ĝ = u − p⁻ ⊙ Jᵀ S⁻¹ J u, u = p⁻ ⊙ ĝ;
    carried p = p⁻ − p⁻² ⊙ Σᵢⱼ (S⁻¹)ᵢⱼ Jᵢ ⊙ Jⱼ.
    """
    xp = ctx.xp
    keys = diagonal.positions(p_state)
    if ctx.curvature is False:
        return {i: p_state[i] * ghat[i] for i in keys}, p_state
    J = woodbury.jacobian_rows([per_example[i] for i in keys], ctx)
    B = J[0].shape[0]
    p_minus = [xp.reshape(predict(p_state[i], beta, prior_var), (-1,)) for i in keys]
    eye = xp.eye(B, dtype=ctx.sdtype, device=ctx.device)
    S = (B / (1.0 - beta)) * eye + sum((Jl * pm) @ xp.matrix_transpose(Jl)
                                        for Jl, pm in zip(J, p_minus))
    S_inv = small_spd_inverse(S, xp, tol=ctx.tol, max_iter=ctx.max_iter, name="Kalman S")
    u = [pm * xp.reshape(ghat[i], (-1,)) for i, pm in zip(keys, p_minus)]
    w = S_inv @ sum(Jl @ ul for Jl, ul in zip(J, u))
    out, new = {}, list(p_state)
    for i, Jl, pm, ul in zip(keys, J, p_minus, u):
        shape = tuple(p_state[i].shape)
        d = ul - pm * (w @ Jl)
        diag_term = xp.sum(Jl * (S_inv @ Jl), axis=0)
        p_plus = xp.maximum(pm - pm * pm * diag_term, P_FLOOR * pm)
        p_plus = xp.reshape(p_plus, shape)
        old = p_state[i]
        new[i] = select(ctx.curvature, p_plus, old, xp)
        out[i] = select(ctx.curvature, xp.reshape(d, shape), old * ghat[i], xp)
    return out, tuple(new)


def _predict_correct(F_prev, P_prev, rows, divisor, shift, beta_t, ctx, name):
    """One factor: M = βF + (1−β)shift·I, P⁻ = X₀(2I − M X₀), X₀ = P/β, then the RLS
    correction with c = (1−β)/divisor (n for A, B for S):
    P⁺ = P⁻ − P⁻aᵀ(c⁻¹I + aP⁻aᵀ)⁻¹aP⁻ (§3.3 kfac steps 1–2).

    At the first update (β_t = 0) X₀ = M⁻¹ = I/shift exactly. The bound ‖I − M X₀‖ ≤ (1−β)/β
    assumes the damping split π did not move; where it moved so far that ‖I − M X₀‖_F ≥ 1/2
    (or the product is not finite), P⁻ is instead the Newton–Schulz inverse of M warm started
    from X₀, so the predicted belief stays positive definite. Returns (F_new, P⁺).
    Where n ≥ d the n × n system is no cheaper: P⁺ is the Newton–Schulz inverse of F_new,
    warm started from P⁻.
    """
    xp = ctx.xp
    d = F_prev.shape[0]
    n = rows.shape[0]
    eye = xp.eye(d, dtype=ctx.sdtype, device=ctx.device)
    M = beta_t * F_prev + ((1.0 - beta_t) * shift) * eye
    safe_beta = xp.where(beta_t > 0, beta_t, xp.ones_like(beta_t))
    X0 = xp.where(beta_t > 0, P_prev / safe_beta, eye / shift)
    R = eye - M @ X0
    P_minus = X0 + X0 @ R  # = X₀(2I − M X₀)
    far = ~(frobenius(R, xp) < 0.5)
    if concrete_bool(far) is not False:
        exact = spd_inverse(M, xp, method=ctx.method, warm=X0, tol=ctx.tol,
                            max_iter=ctx.max_iter, name=f"M of {name}")
        P_minus = xp.where(far, exact, P_minus)
    c = (1.0 - beta_t) / divisor
    F_new = M + c * (xp.matrix_transpose(rows) @ rows)
    if n >= d:
        P_plus = spd_inverse(F_new, xp, method=ctx.method, warm=P_minus, tol=ctx.tol,
                             max_iter=ctx.max_iter, name=name)
        return F_new, P_plus
    aP = rows @ P_minus
    K = (xp.eye(n, dtype=ctx.sdtype, device=ctx.device) / c) + aP @ xp.matrix_transpose(rows)
    K_inv = small_spd_inverse(K, xp, tol=ctx.tol, max_iter=ctx.max_iter,
                              name=f"RLS system of {name}")
    P_plus = P_minus - xp.matrix_transpose(aP) @ (K_inv @ aP)
    return F_new, symmetrize(P_plus, xp)


def kfac_step(layers, batch_rows, beta, damping, ctx, keys):
    """Kronecker belief (§3.3 kfac): on curvature steps predict + correct every layer's P_A,
    P_S; on inverse steps refresh them directly from the carried damped factors (§2.1),
    warm started, which stops drift. batch_rows: the layers' LayerRows (None off curvature)."""
    xp = ctx.xp
    if ctx.curvature is not False:
        beta_t = xp.where(ctx.first, xp.zeros((), dtype=ctx.sdtype, device=ctx.device),
                          xp.full((), beta, dtype=ctx.sdtype, device=ctx.device))
        root = xp.sqrt(xp.asarray(damping, dtype=ctx.sdtype, device=ctx.device))
        layers = tuple(_observe(layer, r, beta_t, root, ctx, keys)
                       for layer, r in zip(layers, batch_rows))
    if ctx.inverse is not False:
        layers = kfac.refresh(layers, lambda layer: (layer.A, layer.S), ctx, keys)
    return layers


def _observe(layer, r, beta_t, root, ctx, keys):
    """One layer's predict + correct with this batch's rows (selected on curvature steps)."""
    xp, L = ctx.xp, layer.layout
    a, s = ctx.gather(r.a), ctx.gather(r.s)
    batch = r.batch * (a.shape[0] // r.a.shape[0])  # B over all replicas
    tr_a = beta_t * layer.trace_A + (1.0 - beta_t) * xp.sum(a * a) / a.shape[0]
    tr_s = beta_t * layer.trace_S + (1.0 - beta_t) * xp.sum(s * s) / batch
    pi = kfac.pi_split(tr_a, L.d_in_ext, tr_s, L.d_out, xp)
    name = f"layer {keys[L.weight]!r}"
    A, PA = _predict_correct(layer.A, layer.A_inv, a, a.shape[0], pi * root, beta_t, ctx,
                             f"A of {name}")
    S, PS = _predict_correct(layer.S, layer.S_inv, s, batch, root / pi, beta_t, ctx,
                             f"S of {name}")
    fresh = layer._replace(A=A, S=S, A_inv=PA, S_inv=PS, trace_A=tr_a, trace_S=tr_s)
    return type(layer)(*(v if isinstance(v, type(L)) else select(ctx.curvature, v, o, xp)
                         for v, o in zip(fresh, layer)))
