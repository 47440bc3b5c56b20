"""RENG, RING and R-Kalman: their directions and their builders (ALGORITHMS.md §3).

Each builder validates every hyperparameter through its config record (`grng_core.config`:
ValueError naming it, its value and the allowed range) and returns an `Optimizer` whose
`update` ends with the common tail of §3. The builders' signatures are the records'.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from grng_core import fused, kalman, preconditioner
from grng_core.config import CONFIGS, Config, RENGConfig, RINGConfig, RKalmanConfig
from grng_core.config import is_static_zero as _static_zero
from grng_core.optimizer import Optimizer
from grng_core.state import Belief
from grng_core.structures import kfac


class Algorithm(NamedTuple):
    """The parts that differ between RENG, RING and R-Kalman."""

    init: Callable[..., Any]  # (config, layouts, leaves, xp, sdtype, dev) -> curvature state
    direction: Callable[..., Any]  # (env, curvature state) -> (d, ĝ, new curvature state)


def _reng_direction(env, state):
    """§3.1: d = (F + λI)⁻¹ ĝ."""
    reg = env.regularized_gradient()
    d, new = preconditioner.update_and_solve(env, state, reg.leaves, passes=reg.passes)
    return d, reg.leaves, new


def _ring_direction(env, state):
    """§3.2, form "adaptive_damping": d = (F + c_t I)⁻¹ g, c_t = λ + ρ‖g‖² (‖g‖² over every
    leaf); form "gauss_newton": d = (1 − ρλ)(F + λI)⁻¹ g + ρ g (H ≈ F substituted exactly).
    Neither needs an extra gradient."""
    if env.h.form == "adaptive_damping":
        if _static_zero(env.h.rho):
            damping = env.damping
        else:
            damping = env.damping + env.rho * env.grad_sq_norm()
        sol, new = preconditioner.update_and_solve(env, state, env.g, damping)
        return sol, env.g, new
    sol, new = preconditioner.update_and_solve(env, state, env.g)
    if _static_zero(env.h.rho):
        return sol, env.g, new
    c = 1.0 - env.rho * env.damping
    xp = env.ctx.xp
    return [fused.axpby(c, s, env.rho, g, xp) for s, g in zip(sol, env.g)], env.g, new


def _rkalman_direction(env, state: Belief):
    """§3.3: the mean moves along P⁺ ĝ; the belief is updated by the Kalman filter."""
    h, ctx = env.h, env.ctx
    reg = env.regularized_gradient()
    ghat = reg.leaves
    beta, prior = h.kalman_decay, h.prior_var
    if h.structure == "woodbury":
        if env.per_example is None:
            raise ValueError("rkalman with structure 'woodbury' needs "
                             "stats.per_example_grads on every step")
        out, diag = kalman.woodbury_step(state.diagonal, ghat, env.per_example, beta, prior,
                                         ctx)
    else:
        out, diag = kalman.diagonal_step(state.diagonal, ghat, env.g, env.per_example, beta,
                                         prior, ctx)
    layers = state.kfac
    if layers:
        batch_rows = preconditioner.layer_rows(env, layers)
        flags = preconditioner.layer_flags(env, layers, batch_rows)
        layers = kalman.kfac_step(layers, batch_rows, h.ema_decay, env.damping,
                                  h.kalman_predict_steps, ctx, env.container.keys, flags)
        use = preconditioner.vector_rows(env, layers, batch_rows, ghat, reg.passes)
        out.update(kfac.precondition(layers, ghat, ctx.xp, use))
    return [out[i] for i in range(len(ghat))], ghat, Belief(diagonal=diag, kfac=layers)


ALGORITHMS = {
    "reng": Algorithm(preconditioner.init, _reng_direction),
    "ring": Algorithm(preconditioner.init, _ring_direction),
    "rkalman": Algorithm(kalman.init, _rkalman_direction),
}


def build(config: Config) -> Optimizer:
    """The optimizer of a validated config record."""
    return Optimizer(config, ALGORITHMS[config.algorithm])


def _builder(config_cls, summary: str):
    def builder(*args, **kwargs) -> Optimizer:
        return build(config_cls(*args, **kwargs))

    builder.__name__ = builder.__qualname__ = config_cls.algorithm
    builder.__signature__ = inspect.signature(config_cls).replace(  # type: ignore[attr-defined]
        return_annotation=Optimizer)
    builder.__doc__ = (f"{summary}\n\n    Hyperparameters (`grng_core.config."
                       f"{config_cls.__name__}`):\n{config_cls.doc_table(indent='      ')}\n")
    return builder


reng = _builder(RENGConfig, "RENG, Regularized Explicit Natural Gradient (§3.1): "
                "d = (F + λI)⁻¹ ĝ. rho = 0 is plain damped natural gradient (NGD).")
ring = _builder(RINGConfig, "RING, Regularized Implicit Natural Gradient (§3.2): "
                "form='adaptive_damping' (default) d = (F + (λ + ρ‖g‖²)I)⁻¹ g; "
                "form='gauss_newton' d = (1 − ρλ)(F + λI)⁻¹ g + ρ g (requires 0 ≤ ρλ ≤ 1).")
rkalman = _builder(RKalmanConfig, "R-Kalman (§3.3): a Kalman filter over the parameters; the "
                   "mean moves along P⁺ ĝ (σ₀⁻² plays the part of damping).")
BUILDERS = {name: {"reng": reng, "ring": ring, "rkalman": rkalman}[name] for name in CONFIGS}

__all__ = ["ALGORITHMS", "BUILDERS", "build", "reng", "ring", "rkalman"]
