"""R-Kalman beliefs: a Kalman filter over the parameters (ALGORITHMS.md §3.3).

The filter keeps P (the inverse-Fisher stand-in) directly; no Fisher is ever inverted.
Three beliefs, each returning the direction P⁺ĝ and the carried state:
- `woodbury`: diagonal p with an exact batch correction from per-example gradients J;
- `diagonal`: p⁺ = 1 / (1/p⁻ + (1 − β_K) q);
- `kfac`: P_S ⊗ P_A per layer from its prior onward, predicted by Newton–Schulz steps and
  corrected by a recursive-least-squares (Woodbury) update with the batch rows, in blocks of
  ⌈d/4⌉ rows: no factor is ever inverted (the direct refresh is optional).
"""

from __future__ import annotations

import math

from grng_core import lapack
from grng_core.concrete import branch, branchable, concrete_bool
from grng_core.context import select
from grng_core.linalg import (
    cholesky_inverse,
    frobenius,
    has_linalg,
    newton_schulz_inverse,
    small_spd_inverse,
    symmetrize,
)
from grng_core.state import Belief
from grng_core.structures import diagonal, kfac, woodbury
from grng_core.structures.factored import probes
from grng_core.tree import device

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


def _spectral_estimate(R, xp, iterations: int = 4):
    """An estimate of ‖R‖₂ for the predict's convergence test: the larger of the RMS singular
    value ‖R‖_F/√d and a few power iterations from fixed probe vectors (O(d²) each). ‖R‖_F
    itself grows like √d with an error spread over every direction (a π move shifts them all)
    and would send most predicts of a wide factor to the iterated path."""
    d = R.shape[0]
    V = xp.matrix_transpose(probes(d, xp, R.dtype, device(R)))  # d × 2
    tiny = float(xp.finfo(R.dtype).smallest_normal)  # a zero R: 0/√tiny, not 0/0 (float32 too)
    for _ in range(iterations):
        V = V / xp.sqrt(xp.sum(V * V, axis=0, keepdims=True) + tiny)
        V = R @ V
    power = xp.max(xp.sqrt(xp.sum(V * V, axis=0)))
    return xp.maximum(frobenius(R, xp) / math.sqrt(d), power)


def _predict(F_prev, P_prev, shift, beta_t, steps, ctx, name, rescue=None):
    """Kalman predict of one factor, matmul only (§3.3 kfac step 1): M = βF + (1−β)shift·I,
    X₀ = P/β, then `steps` Newton–Schulz steps X ← X(2I − M X). At the first update
    (β_t = 0) X₀ = M⁻¹ = I/shift exactly. The bound ‖I − M X₀‖ ≤ (1−β)/β assumes π did not
    move; where it moved so far that ‖I − M X₀‖₂ ≥ 1/2 (estimated, `_spectral_estimate`; or
    the product is not finite),
    Newton–Schulz is iterated from X₀ (cold started if X₀ is too far) until
    ‖I − M X‖_F ≤ ((1−β)/β)², so the belief stays positive definite. Returns (M, P⁻)."""
    xp = ctx.xp
    eye = xp.eye(F_prev.shape[0], dtype=ctx.sdtype, device=ctx.device)
    M = beta_t * F_prev + ((1.0 - beta_t) * shift) * eye
    safe_beta = xp.where(beta_t > 0, beta_t, xp.ones_like(beta_t))
    X = xp.where(beta_t > 0, P_prev / safe_beta, eye / shift)
    R = eye - M @ X
    far = ~(_spectral_estimate(R, xp) < 0.5)
    X0 = X
    for _ in range(steps):
        X = X + X @ R  # = X(2I − M X)
        R = eye - M @ X
    if concrete_bool(far) is False:
        return M, X
    target = ((1.0 - beta_t) / safe_beta) ** 2 / math.sqrt(M.shape[0])

    def iterate():
        return newton_schulz_inverse(M, xp, warm=X0, tol=target, max_iter=ctx.max_iter,
                                     name=f"M of {name}", rescue=rescue)[0]

    if branchable(far):
        return M, branch(far, iterate, lambda: X)
    return M, xp.where(far, iterate(), X)


#: Rows per RLS block (§3.3): ⌈d/4⌉, at least 64 (at most n). A block of m rows costs
#: 2md² + 2m²d + m³, so n rows in blocks of d/4 cost about 2.6·n·d² against 5·n·d² in blocks of d.
RLS_MIN_BLOCK = 64
#: More rows than this many times the width are first compressed to d rows by a QR (2nd²).
RLS_QR_RATIO = 8


def rls_block(d: int, n: int) -> int:
    """Rows per block of the RLS correction of a d × d factor with n rows."""
    return max(1, min(n, max(RLS_MIN_BLOCK, -(-d // 4))))


def _correct(P, rows, c, ctx, name):
    """RLS correction with the rows (§3.3 kfac step 2): P⁺ = P − Paᵀ(c⁻¹I + aPaᵀ)⁻¹aP, in
    blocks of `rls_block` rows in turn (the same P⁺ in exact arithmetic; only the innovation
    systems, at most d × d, are solved, never a factor).

    Many more rows than the width (n > 8d, e.g. a convolution's positions): the rows are first
    compressed to d rows with the same aᵀa, R from a = QR (cost about 2n·d²), where the
    namespace has linalg."""
    xp = ctx.xp
    d, n = P.shape[0], rows.shape[0]
    if n > RLS_QR_RATIO * d and has_linalg(xp) and hasattr(xp.linalg, "qr"):
        rows = lapack.qr_r(rows, xp)  # (d × d) with Rᵀ R = aᵀ a
        n = d
    block = rls_block(d, n)
    for start in range(0, n, block):
        a = rows[start:min(start + block, n), :]
        m = a.shape[0]
        aP = a @ P
        K = (xp.eye(m, dtype=ctx.sdtype, device=ctx.device) / c) + aP @ xp.matrix_transpose(a)
        # a belief that rounding made indefinite (float32, rows far larger than the damping)
        # skips the step (counted, reported) rather than ending the run
        K_inv = small_spd_inverse(symmetrize(K, xp), xp, tol=ctx.tol, max_iter=ctx.max_iter,
                                  name=f"RLS system of {name}", strict=False)
        P = symmetrize(P - xp.matrix_transpose(aP) @ (K_inv @ aP), xp)
    return P


def _predict_correct(F_prev, P_prev, rows, divisor, shift, beta_t, steps, ctx, name,
                     damped=None):
    """One factor's predict and correct, c = (1−β)/divisor (n for A, B for S): (F_new, P⁺).
    Where rounding made the belief indefinite (an innovation system that does not factorise:
    float32, rows far larger than the damping) P⁺ is refreshed directly as F_new⁻¹ on the host
    (§2.1, the carried damped factor; extra damping reported as for K-FAC), so the filter goes
    on instead of skipping every later step; traced, the step is skipped (NaN)."""
    xp = ctx.xp
    M, P_minus = _predict(F_prev, P_prev, shift, beta_t, steps, ctx, name,
                          damped and damped("extra damping"))
    c = (1.0 - beta_t) / divisor
    F_new = M + c * (xp.matrix_transpose(rows) @ rows)
    P_plus = _correct(P_minus, rows, c, ctx, name)
    failed = ~xp.all(xp.isfinite(P_plus))
    if concrete_bool(failed) is False:
        return F_new, P_plus

    rescue = damped and damped("belief refreshed")

    if concrete_bool(failed):  # on the host only: under jit (and on eager accelerators) the
        # step is skipped and counted instead (an in-graph refresh branch deadlocked XLA:CPU
        # under jit(vmap) over 8 seeds)
        if rescue is not None:
            rescue(0.0)
        return F_new, cholesky_inverse(symmetrize(F_new, xp), xp, name, strict=False,
                                       rescue=rescue)
    return F_new, P_plus


def _diagonal_predict_correct(F_prev, freq, shift, beta_t):
    """An embedding's diagonal A (§2.1, §3.3): predict M = βF + (1−β)shift, correct with the
    one-hot rows F⁺ = M + (1−β)·freq, and P⁺ = 1/F⁺, exact elementwise (the RLS update of a
    diagonal with one-hot rows)."""
    F_new = beta_t * F_prev + (1.0 - beta_t) * (shift + freq)
    return F_new, 1.0 / F_new


def kfac_step(layers, batch_rows, beta, damping, steps, ctx, keys, flags):
    """Kronecker belief (§3.3 kfac): on a layer's curvature steps predict (`steps`
    Newton–Schulz steps) and correct its P_A, P_S, inverting no factor; on its inverse steps
    (only with `kalman_refresh_every`) refresh them directly from the carried damped factors
    (§2.1). batch_rows: the layers' LayerRows (None off curvature); flags: (curvature,
    inverse) per layer (`grng_core.schedule.layer_flags`)."""
    xp = ctx.xp
    if ctx.curvature is not False:
        beta_t = xp.where(ctx.first, xp.zeros((), dtype=ctx.sdtype, device=ctx.device),
                          xp.full((), beta, dtype=ctx.sdtype, device=ctx.device))
        root = xp.sqrt(xp.asarray(damping, dtype=ctx.sdtype, device=ctx.device))
        layers = tuple(layer if curvature is False
                       else _observe(layer, r, beta_t, root, steps, ctx, keys, curvature)
                       for layer, r, (curvature, _) in zip(layers, batch_rows, flags))
    if ctx.inverse is not False:
        layers = kfac.refresh(layers, lambda layer: (layer.A, layer.S), ctx, keys,
                              [inverse for _, inverse in flags])
    return layers


def _observe(layer, r, beta_t, root, steps, ctx, keys, curvature):
    """One layer's predict + correct with this batch's rows (selected on `curvature`)."""
    xp, L = ctx.xp, layer.layout
    if r.gram is not None:
        raise ValueError(f"layer {keys[L.weight]!r}: R-Kalman's belief observes the input rows "
                         "themselves (§3.3): pass LayerStats.inputs as rows, not an InputGram "
                         "(Requirements.input_gram is False for R-Kalman)")
    s = ctx.gather(r.s)
    batch = r.batch * (s.shape[0] // r.s.shape[0])  # B over all replicas
    if L.a_diagonal:  # token frequencies: Â itself, averaged over replicas
        a = ctx.mean(r.a)
        tr_a_hat = xp.sum(a)
    else:
        a = ctx.gather(r.a)
        tr_a_hat = xp.sum(a * a) / a.shape[0]
    tr_a = beta_t * layer.trace_A + (1.0 - beta_t) * tr_a_hat
    tr_s = beta_t * layer.trace_S + (1.0 - beta_t) * xp.sum(s * s) / batch
    pi = kfac.pi_split(tr_a, L.d_in_ext, tr_s, L.d_out, xp)
    name = f"layer {keys[L.weight]!r}"
    log = ctx.incidents

    def damped(factor):  # kind -> the callable extra damping is reported to
        if log is None:
            return None
        return lambda kind: log.rescue(L.weight, factor, keys[L.weight], kind)

    if L.a_diagonal:
        A, PA = _diagonal_predict_correct(layer.A, a, pi * root, beta_t)
    else:
        A, PA = _predict_correct(layer.A, layer.A_inv, a, a.shape[0], pi * root, beta_t,
                                 steps, ctx, f"A of {name}", damped("A"))
    S, PS = _predict_correct(layer.S, layer.S_inv, s, batch, root / pi, beta_t, steps, ctx,
                             f"S of {name}", damped("S"))
    fresh = layer._replace(A=A, S=S, A_inv=PA, S_inv=PS, trace_A=tr_a, trace_S=tr_s)
    return type(layer)(*(v if v is None or isinstance(v, type(L))
                         else select(curvature, v, o, xp) for v, o in zip(fresh, layer)))
