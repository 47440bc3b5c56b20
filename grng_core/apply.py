"""`apply_updates(params, updates)`: θ + u leaf by leaf, in each parameter's dtype (optax's)."""

from __future__ import annotations

from grng_core.tree import flatten, leaves_like, namespace


def apply_updates(params, updates):
    leaves, container = flatten(params)
    ups = leaves_like(updates, container, "updates")
    xp = namespace(("params", leaves), ("updates", ups))
    return container.build([p + xp.astype(u, p.dtype, copy=False) for p, u in zip(leaves, ups)])
