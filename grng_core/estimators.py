"""Estimators of the regularised gradient ĝ ≈ ∇L_ρ = g + ρHg (ALGORITHMS.md §1).

`double_backprop`: ĝ = g + ρ·Hg from the oracle's Hessian-vector product.
`finite_difference` with ε = r/‖g‖ (r = fd_radius), on the same batch:
  forward  ĝ = (1 − ρ/ε) g + (ρ/ε) g⁺,  g⁺ = ∇L(θ + εg)
  backward ĝ = (1 + ρ/ε) g − (ρ/ε) g⁻,  g⁻ = ∇L(θ − εg)
  central  ĝ = g + ρ (g⁺ − g⁻)/(2ε)
computed as g + (ρ/ε)(g⁺ − g) etc. (the same numbers with less cancellation). ‖g‖ = 0 gives
ĝ = g (selected with `where`, so it traces). Where the oracle gives its passes' K-FAC rows
(`Oracle.grad_rows_fn`), ĝ also comes as Σ cᵢ·(pass i's gradient) with each pass's Stats
(`Regularized.passes`), which the factored form reads (§2.1).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from grng_core.tree import flatten, tree_inner
from grng_core.types import Stats


class Regularized(NamedTuple):
    """ĝ per leaf; `passes`: ((cᵢ, Statsᵢ), ...) with ĝ = Σ cᵢ·(gradient of pass i), Stats
    None for the batch's own pass (the step's stats), or None where the passes' rows are
    unknown."""

    leaves: list
    passes: tuple[tuple[Any, Stats | None], ...] | None = None


def _need(oracle, field: str, why: str):
    fn = None if oracle is None else getattr(oracle, field)
    if fn is None:
        raise ValueError(f"{why} needs oracle.{field} (pass oracle=gc.Oracle({field}=...))")
    return fn


def _call(fn, container, args, ctx) -> list:
    return _leaves(fn(*[container.build(a) for a in args]), fn, ctx, args[0], container)


def _leaves(result, fn, ctx, like, container) -> list:
    """The oracle's result as leaves in the state dtype: the params' keys in their order, each
    leaf of its parameter's shape (a wrong one is named here, not left to a broadcast error
    later or, for keys in another order, to a silently misplaced ĝ)."""
    what = f"the oracle's {getattr(fn, '__name__', fn)!r}"
    leaves, c = flatten(result, f"{what} result")
    if len(leaves) != len(like):
        raise ValueError(f"{what} returned {len(leaves)} leaves, the params have {len(like)}")
    if c.keys != container.keys:
        raise ValueError(f"{what} returned keys {c.keys}, the params have {container.keys}: "
                         "return the params' container, its keys in their order")
    for k, x, p in zip(c.keys, leaves, like):
        if tuple(x.shape) != tuple(p.shape):
            raise ValueError(f"{what} returned leaf {k!r} of shape {tuple(x.shape)}, the "
                             f"parameter's is {tuple(p.shape)}: it must return a "
                             "gradient-shaped tree like params")
    return [ctx.xp.astype(x, ctx.sdtype, copy=False) for x in leaves]


def global_norm(leaves, xp):
    return xp.sqrt(tree_inner(leaves, leaves, xp))


def double_backprop(g, params, rho, oracle, container, ctx) -> list:
    """ĝ = g + ρ H g (§1, exact)."""
    hvp = _need(oracle, "hvp_fn", "gr='double_backprop'")
    vec = [ctx.xp.astype(gi, p.dtype, copy=False) for gi, p in zip(g, params)]
    Hg = _call(hvp, container, (params, vec), ctx)
    return [gi + rho * h for gi, h in zip(g, Hg)]


def _takes_key(fn) -> bool:
    """Whether an `along_fn` takes the `key` keyword (one written for `along_fn(c)` does not)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "key" or p.kind is p.VAR_KEYWORD for p in params)


def shift_key(sign: float, radius, eps):
    """What fixes a shifted pass's c = sign·r/‖g‖ within one step of a model in parts
    (`Oracle.along_fn`'s key: every part reads the same whole ‖g‖, so parts with equal keys
    can share one pass): (sign, r, dtype of c); None where r is not a Python number."""
    if not isinstance(radius, (int, float)) or isinstance(radius, bool):
        return None
    return ("finite_difference", float(sign), float(radius), str(eps.dtype))


def finite_difference(g, params, rho, radius, scheme, oracle, container, ctx,
                      sq_norm=None) -> Regularized:
    """ĝ by forward, backward or central differences of the gradient along g (§1), with its
    passes' coefficients where the oracle gives their rows. `sq_norm`: ‖g‖² of the whole
    model where g is one part of it (`Whole`; the oracle's `along_fn` then moves every
    part), else None."""
    xp = ctx.xp
    own_base = bool(getattr(oracle, "own_base", False)) and scheme != "central"
    # the factored form's coefficients assume the passed g is the base pass (no rows for
    # another base): with an own base ĝ is preconditioned densely
    with_rows = None if own_base else getattr(oracle, "grad_rows_fn", None)
    grad_fn = with_rows or _need(oracle, "grad_fn", "gr='finite_difference'")
    norm = global_norm(g, xp) if sq_norm is None else xp.sqrt(sq_norm)
    along = None if own_base else getattr(oracle, "along_fn", None)
    positive = norm > 0
    eps = radius / xp.where(positive, norm, xp.ones_like(norm))
    stats: list = []

    def shifted(sign):
        if along is not None:  # the adapter moves the whole model by c·g
            key = shift_key(sign, radius, eps)
            out = along(sign * eps, key=key) if _takes_key(along) else along(sign * eps)
        else:
            moved = [p + xp.astype(sign * eps * gi, p.dtype, copy=False)
                     for p, gi in zip(params, g)]
            out = (with_rows or grad_fn)(container.build(moved))
        if with_rows is None:
            return _leaves(out, grad_fn, ctx, g, container)
        grads, pass_stats = out
        stats.append(Stats() if pass_stats is None else pass_stats)  # None: no rows
        return _leaves(grads, with_rows, ctx, g, container)

    base = _call(grad_fn, container, (params,), ctx) if own_base else g
    if scheme == "forward":
        gp = shifted(1.0)
        diff = [(a - b) / eps for a, b in zip(gp, base)]
    elif scheme == "backward":
        gm = shifted(-1.0)
        diff = [(b - a) / eps for a, b in zip(gm, base)]
    else:
        gp, gm = shifted(1.0), shifted(-1.0)
        diff = [(a - b) / (2.0 * eps) for a, b in zip(gp, gm)]
    leaves = [xp.where(positive, gi + rho * di, gi) for gi, di in zip(g, diff)]
    if with_rows is None:
        return Regularized(leaves)
    k = xp.where(positive, rho / eps, xp.zeros_like(eps))  # ĝ = g + k·(difference)
    coefs = {"forward": (1.0 - k, k), "backward": (1.0 + k, -k),
             "central": (xp.ones_like(k), 0.5 * k, -0.5 * k)}[scheme]
    return Regularized(leaves, tuple(zip(coefs, [None, *stats])))
