"""Estimators of the regularised gradient ĝ ≈ ∇L_ρ = g + ρHg (ALGORITHMS.md §1).

`double_backprop`: ĝ = g + ρ·Hg from the oracle's Hessian-vector product.
`finite_difference` with ε = r/‖g‖ (r = fd_radius), on the same batch:
  forward  ĝ = (1 − ρ/ε) g + (ρ/ε) g⁺,  g⁺ = ∇L(θ + εg)
  backward ĝ = (1 + ρ/ε) g − (ρ/ε) g⁻,  g⁻ = ∇L(θ − εg)
  central  ĝ = g + ρ (g⁺ − g⁻)/(2ε)
computed as g + (ρ/ε)(g⁺ − g) etc. (the same numbers with less cancellation). ‖g‖ = 0 gives
ĝ = g (selected with `where`, so it traces).
"""

from __future__ import annotations

from grng_core.tree import flatten, tree_inner


def _need(oracle, field: str, why: str):
    fn = None if oracle is None else getattr(oracle, field)
    if fn is None:
        raise ValueError(f"{why} needs oracle.{field} (pass oracle=gc.Oracle({field}=...))")
    return fn


def _call(fn, container, args, ctx) -> list:
    leaves, _ = flatten(fn(*[container.build(a) for a in args]), f"the oracle's {fn!r} result")
    return [ctx.xp.astype(x, ctx.sdtype, copy=False) for x in leaves]


def global_norm(leaves, xp):
    return xp.sqrt(tree_inner(leaves, leaves, xp))


def double_backprop(g, params, rho, oracle, container, ctx) -> list:
    """ĝ = g + ρ H g (§1, exact)."""
    hvp = _need(oracle, "hvp_fn", "gr='double_backprop'")
    vec = [ctx.xp.astype(gi, p.dtype, copy=False) for gi, p in zip(g, params)]
    Hg = _call(hvp, container, (params, vec), ctx)
    return [gi + rho * h for gi, h in zip(g, Hg)]


def finite_difference(g, params, rho, radius, scheme, oracle, container, ctx) -> list:
    """ĝ by forward, backward or central differences of the gradient along g (§1)."""
    xp = ctx.xp
    grad_fn = _need(oracle, "grad_fn", "gr='finite_difference'")
    norm = global_norm(g, xp)
    positive = norm > 0
    eps = radius / xp.where(positive, norm, xp.ones_like(norm))

    def shifted(sign):
        moved = [p + xp.astype(sign * eps * gi, p.dtype, copy=False) for p, gi in zip(params, g)]
        return _call(grad_fn, container, (moved,), ctx)

    if scheme == "forward":
        gp = shifted(1.0)
        diff = [(a - b) / eps for a, b in zip(gp, g)]
    elif scheme == "backward":
        gm = shifted(-1.0)
        diff = [(b - a) / eps for a, b in zip(gm, g)]
    else:
        gp, gm = shifted(1.0), shifted(-1.0)
        diff = [(a - b) / (2.0 * eps) for a, b in zip(gp, gm)]
    return [xp.where(positive, gi + rho * di, gi) for gi, di in zip(g, diff)]
