"""grng_jax inside ``optax.masked`` / ``optax.multi_transform``: the transformation then sees
only its own leaves (the others are ``optax.MaskedNode``), but ``loss_fn`` needs the whole
model. Pass the full params as ``full_params=`` to ``update`` (optax forwards extra arguments
to the inner transformation): the losses handed to the collection are then functions of this
transformation's leaves with every other leaf taken from ``full_params``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def has_masked(params) -> bool:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_masked)
    return any(_is_masked(x) for x in leaves)


def unmask(name: str, params, full_params, loss_fn, mc_loss_fn):
    """(loss_fn, mc_loss_fn) as functions of the (masked) `params`: unchanged without
    MaskedNodes; with them, `full_params` fills the masked leaves (ValueError when absent)."""
    if not has_masked(params) or (loss_fn is None and mc_loss_fn is None):
        return loss_fn, mc_loss_fn
    if full_params is None:
        raise ValueError(
            f"grng_jax.{name} runs inside optax.masked / optax.multi_transform, so it sees only "
            "its own parameters, but loss_fn needs the whole model: pass the full params too, "
            "opt.update(grads, state, params, loss_fn=..., batch=..., full_params=params)")
    return _merged(loss_fn, params, full_params), _merged(mc_loss_fn, params, full_params)


def _merged(fn: Callable | None, masked, full) -> Callable | None:
    """fn(full params with this transformation's leaves replaced by `own`, *args)."""
    if fn is None:
        return None
    slots, treedef_ = jax.tree_util.tree_flatten(masked, is_leaf=_is_masked)
    treedef: Any = treedef_
    full_leaves = treedef.flatten_up_to(full)
    own_at = [i for i, x in enumerate(slots) if not _is_masked(x)]

    def merged(own, *args):
        leaves = list(full_leaves)
        for i, x in zip(own_at, jax.tree_util.tree_leaves(own)):
            leaves[i] = x
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), *args)

    return merged
