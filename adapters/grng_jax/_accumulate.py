"""``grng_jax.multi_steps(opt, every_k)``: gradient accumulation that runs the optimizer once
per real step.

``optax.MultiSteps`` calls the wrapped transformation's ``update`` on every micro-step and
keeps its result only on the last (``jnp.where(emit, new, old)``), so a GRNG optimizer inside it
collects statistics and refreshes its inverses every micro-step. Here the update sits in a
``lax.cond`` on the last micro-step: the other micro-steps only add their gradient to the
running mean (and return zero updates). On the last micro-step the optimizer sees the mean
gradient and the ``loss_fn`` / ``batch`` of that micro-step: its curvature statistics come from
that micro-batch (the gradient is then not their product, so K-FAC preconditions it densely,
§2.1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax


class MultiStepsState(NamedTuple):
    """mini_step: micro-steps since the last real step; mean: the running mean gradient;
    inner: the wrapped optimizer's state."""

    mini_step: jax.Array
    mean: Any
    inner: Any


def multi_steps(opt: optax.GradientTransformation, every_k: int
                ) -> optax.GradientTransformationExtraArgs:
    """`opt` applied once every `every_k` calls to the mean of their gradients."""
    if not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"every_k={every_k!r} must be a positive int")

    def init_fn(params):
        return MultiStepsState(jnp.zeros((), jnp.int32),
                               jax.tree_util.tree_map(jnp.zeros_like, params), opt.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        k = state.mini_step
        mean = jax.tree_util.tree_map(lambda m, u: m + (u - m) / (k + 1).astype(m.dtype),
                                      state.mean, updates)

        def emit():
            out, inner = opt.update(mean, state.inner, params, **extra_args,
                                    **({"grng_accumulated": True} if every_k > 1 else {}))
            return out, inner, jax.tree_util.tree_map(jnp.zeros_like, mean)

        def accumulate():
            return jax.tree_util.tree_map(jnp.zeros_like, updates), state.inner, mean

        out, inner, mean = lax.cond(k == every_k - 1, emit, accumulate)
        return out, MultiStepsState((k + 1) % every_k, mean, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
