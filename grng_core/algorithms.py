"""RENG, RING and R-Kalman: their directions and their builders (ALGORITHMS.md §3).

Each builder validates every hyperparameter (ValueError naming it, its value and the allowed
range) and returns an `Optimizer` whose `update` ends with the common tail of §3.
"""

from __future__ import annotations

from grng_core import kalman, preconditioner
from grng_core.hyperparams import (
    ESTIMATORS,
    FD_SCHEMES,
    FISHERS,
    INVERSE_METHODS,
    ON_NONFINITE,
    STATE_DTYPES,
    STRUCTURES,
    check_choice,
    check_int,
    check_range,
    check_scheduled,
    is_static_zero,
)
from grng_core.optimizer import Optimizer
from grng_core.structures import kfac
from grng_core.types import Requirements


# ---------------------------------------------------------------- directions
def _reng_direction(env, state):
    """§3.1: d = (F + λI)⁻¹ ĝ."""
    ghat = env.regularized_gradient()
    d, new = preconditioner.update_and_solve(env, state, ghat)
    return d, ghat, {**state, **new}


def _ring_direction(env, state):
    """§3.2: d = (1 − ρλ)(F + λI)⁻¹ g + ρ g (H ≈ F substituted exactly; no extra gradient)."""
    sol, new = preconditioner.update_and_solve(env, state, env.g)
    if is_static_zero(env.h["rho"]):
        d = sol
    else:
        c = 1.0 - env.rho * env.damping
        d = [c * s + env.rho * g for s, g in zip(sol, env.g)]
    return d, env.g, {**state, **new}


def _rkalman_direction(env, state):
    """§3.3: the mean moves along P⁺ ĝ; the belief is updated by the Kalman filter."""
    h, ctx, xp = env.h, env.ctx, env.ctx.xp
    ghat = env.regularized_gradient()
    beta, prior = h["kalman_decay"], h["prior_var"]
    new = dict(state)
    structure = h["structure"]
    if structure == "woodbury":
        if env.per_example is None:
            raise ValueError("rkalman with structure 'woodbury' needs "
                             "stats.per_example_grads on every step")
        out, new["belief"] = kalman.woodbury_step(state["belief"], ghat, env.per_example, beta,
                                                  prior, ctx)
    else:
        out, new["belief"] = kalman.diagonal_step(state["belief"], ghat, env.g, env.per_example,
                                                  beta, prior, ctx)
    if structure == "kfac":
        layers = kfac.from_state(state["kfac"], env.params)
        stats = None
        if ctx.curvature is not False:
            stats = kfac.match_stats(layers, env.stats.layers, env.container)
        new["kfac"] = kalman.kfac_step(state["kfac"], layers, stats, h["ema_decay"],
                                       env.damping, ctx, env.container.keys)
        out.update(kfac.precondition(new["kfac"], layers, ghat, xp))
    return [out[i] for i in range(len(ghat))], ghat, new


def _init_preconditioner(opt, leaves, container, layers, xp, sdtype, dev):
    return preconditioner.init(opt, leaves, container, layers, xp, sdtype, dev)


def _init_rkalman(opt, leaves, container, layers, xp, sdtype, dev):
    h = opt.hyperparams
    resolved = []
    if h["structure"] == "kfac":
        if layers is None:
            raise ValueError("structure 'kfac' needs the layer layout at init: opt.init(params, "
                             "layers=[gc.LayerSpec(weight=key, bias=key_or_None), ...])")
        resolved = kfac.resolve(layers, container, leaves)
    rest = [i for i in range(len(leaves)) if i not in kfac.covered(resolved)]
    state = {"belief": kalman.init_diag(rest, leaves, h["prior_var"], xp, sdtype, dev)}
    if h["structure"] == "kfac":
        state["kfac"] = kalman.init_kfac(resolved, xp, sdtype, dev)
    return state


# ---------------------------------------------------------------- validation
def _common(lr, damping, structure, fisher, momentum, weight_decay, ema_decay, curvature_every,
            inverse_every, ns_tol, ns_max_iter, inverse_method, kl_clip, state_dtype,
            on_nonfinite) -> dict:
    return dict(
        lr=check_scheduled("lr", lr, low=0.0),
        damping=check_scheduled("damping", damping, low=0.0, low_open=True),
        structure=check_choice("structure", structure, STRUCTURES),
        fisher=check_choice("fisher", fisher, FISHERS),
        momentum=check_range("momentum", momentum, 0.0, 1.0, high_open=True),
        weight_decay=check_range("weight_decay", weight_decay, 0.0),
        ema_decay=check_range("ema_decay", ema_decay, 0.0, 1.0, high_open=True),
        curvature_every=check_int("curvature_every", curvature_every),
        inverse_every=check_int("inverse_every", inverse_every),
        ns_tol=None if ns_tol is None else check_range("ns_tol", ns_tol, 0.0, 1.0,
                                                       low_open=True, high_open=True),
        ns_max_iter=check_int("ns_max_iter", ns_max_iter),
        inverse_method=check_choice("inverse_method", inverse_method, INVERSE_METHODS),
        kl_clip=None if kl_clip is None else check_range("kl_clip", kl_clip, 0.0, low_open=True),
        state_dtype=check_choice("state_dtype", state_dtype, STATE_DTYPES),
        on_nonfinite=check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE),
    )


def _estimator(gr, fd_scheme, fd_radius) -> dict:
    return dict(gr=check_choice("gr", gr, ESTIMATORS),
                fd_scheme=check_choice("fd_scheme", fd_scheme, FD_SCHEMES),
                fd_radius=check_range("fd_radius", fd_radius, 0.0, low_open=True))


def _requirements(h, uses_gr: bool) -> Requirements:
    gr_on = uses_gr and not is_static_zero(h["rho"])
    s = h["structure"]
    # the diagonal's q is a mean of squared per-example gradients; with the "mc" Fisher they
    # must come from sampled labels, so the adapter supplies them (g ⊙ g would be empirical)
    per_example = s == "woodbury" or (s == "diagonal" and h["fisher"] == "mc")
    return Requirements(layer_stats=s == "kfac", per_example_grads=per_example,
                        grad_fn=gr_on and h["gr"] == "finite_difference",
                        hvp_fn=gr_on and h["gr"] == "double_backprop", fisher=h["fisher"])


# ---------------------------------------------------------------- builders
def reng(lr=0.1, rho=0.05, damping=1e-3, *, structure="kfac", gr="double_backprop",
         fd_scheme="forward", fd_radius=1e-3, fisher="empirical", momentum=0.0,
         weight_decay=0.0, ema_decay=0.95, curvature_every=1, inverse_every=1, ns_tol=None,
         ns_max_iter=50, inverse_method="newton_schulz", kl_clip=None, state_dtype=None,
         on_nonfinite="skip") -> Optimizer:
    """RENG, Regularized Explicit Natural Gradient (§3.1): d = (F + λI)⁻¹ ĝ.

    rho = 0 is plain damped natural gradient (the NGD baseline) and needs no oracle.
    """
    h = _common(lr, damping, structure, fisher, momentum, weight_decay, ema_decay,
                curvature_every, inverse_every, ns_tol, ns_max_iter, inverse_method, kl_clip,
                state_dtype, on_nonfinite)
    h.update(_estimator(gr, fd_scheme, fd_radius), rho=check_scheduled("rho", rho, low=0.0))
    return Optimizer("reng", h, _requirements(h, True), _reng_direction, _init_preconditioner)


def ring(lr=0.1, rho=0.05, damping=1e-3, *, structure="kfac", fisher="empirical",
         momentum=0.0, weight_decay=0.0, ema_decay=0.95, curvature_every=1, inverse_every=1,
         ns_tol=None, ns_max_iter=50, inverse_method="newton_schulz", kl_clip=None,
         state_dtype=None, on_nonfinite="skip") -> Optimizer:
    """RING, Regularized Implicit Natural Gradient (§3.2): d = (1 − ρλ)(F + λI)⁻¹ g + ρ g.

    Requires 0 ≤ ρλ ≤ 1 (checked here for constant values).
    """
    h = _common(lr, damping, structure, fisher, momentum, weight_decay, ema_decay,
                curvature_every, inverse_every, ns_tol, ns_max_iter, inverse_method, kl_clip,
                state_dtype, on_nonfinite)
    h["rho"] = check_scheduled("rho", rho, low=0.0)
    if not callable(rho) and not callable(damping) and rho * damping > 1.0:
        raise ValueError(f"invalid rho*damping={rho * damping!r} (rho={rho!r}, "
                         f"damping={damping!r}): RING allowed range is 0 <= rho*damping <= 1")
    h.update(gr=None, fd_scheme=None, fd_radius=None)
    return Optimizer("ring", h, _requirements(h, False), _ring_direction, _init_preconditioner)


def rkalman(lr=1.0, rho=0.05, *, structure="woodbury", gr="finite_difference",
            fd_scheme="forward", fd_radius=1e-3, kalman_decay=0.95, prior_var=1.0,
            damping=1e-3, fisher="empirical", momentum=0.0, weight_decay=0.0, ema_decay=0.95,
            curvature_every=1, inverse_every=10, ns_tol=None, ns_max_iter=50,
            inverse_method="newton_schulz", kl_clip=None, state_dtype=None,
            on_nonfinite="skip") -> Optimizer:
    """R-Kalman (§3.3): a Kalman filter over the parameters; the mean moves along P⁺ ĝ.

    kalman_decay β_K and prior_var σ₀² set the belief (σ₀⁻² plays the part of damping);
    `damping` and `ema_decay` are used by the `kfac` belief (which needs ema_decay > 1/2).
    """
    h = _common(lr, damping, structure, fisher, momentum, weight_decay, ema_decay,
                curvature_every, inverse_every, ns_tol, ns_max_iter, inverse_method, kl_clip,
                state_dtype, on_nonfinite)
    h.update(_estimator(gr, fd_scheme, fd_radius), rho=check_scheduled("rho", rho, low=0.0),
             kalman_decay=check_range("kalman_decay", kalman_decay, 0.0, 1.0, high_open=True),
             prior_var=check_range("prior_var", prior_var, 0.0, low_open=True))
    if structure == "kfac" and not ema_decay > 0.5:
        raise ValueError(f"invalid ema_decay={ema_decay!r}: rkalman with structure 'kfac' "
                         "needs ema_decay in (0.5, 1) for its one-step Newton–Schulz predict")
    return Optimizer("rkalman", h, _requirements(h, True), _rkalman_direction, _init_rkalman)


__all__ = ["reng", "ring", "rkalman"]
