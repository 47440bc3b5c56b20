"""The first step's check that every K-FAC layer's gradient is what its tagged calls' rows
give, G ≈ c·sᵀa/B + α·W + β·b (ALGORITHMS.md §2.1 "This project"; grng_torch makes it on the
host): a weight also used outside its layer (a tie by hand, ``h @ params["wte"]["embedding"].T``;
a kernel in a plain ``jnp`` matmul) or a gradient edited per element before this optimizer has
a part its factors never see. The update runs under jit, so the flags go to the host through a
`jax.debug.callback`, inside a `lax.cond` on the first step: the other steps pay nothing.
Not under `jax.vmap` (there a cond runs both branches, every step), nor for a gradient
`grng_jax.multi_steps` averaged over micro-batches (not the last one's rows' product).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import grng_core as gc
from grng_jax._layers import describe


def check_first_step(name: str, core: gc.Optimizer, grads, state, leaves, stats,
                     params) -> None:
    """Warn (once, at the first step) naming the K-FAC layers whose gradient their rows do
    not explain. Not across replicas (the averaged gradient is no replica's rows')."""
    if not stats.layers or core.config.structure != "kfac" or core.config.fisher != "empirical":
        return
    first = (state.step + state.skipped) == 0

    def check():
        flags = core.explained_flags(grads, state, leaves, stats)
        if flags:
            names = tuple(describe(params, k) for k, _ in flags)
            jax.debug.callback(functools.partial(_warn, name, names), first,
                               jnp.stack([ok for _, ok in flags]))

    lax.cond(first, check, lambda: None)


def _warn(name: str, names: tuple, first, oks) -> None:
    """The host side; under vmap the values may be batched (the cond then runs as a select,
    so the callback also runs on later steps, where `first` is false)."""
    firsts = np.asarray(first).reshape(-1)
    oks = np.asarray(oks).reshape(-1, len(names))
    bad = [n for j, n in enumerate(names) if any(f and not ok for f, ok in zip(firsts, oks[:, j]))]
    if bad:
        warnings.warn(
            f"grng_jax.{name}: the first step's gradient of K-FAC layer(s) "
            f"{', '.join(map(repr, bad))} is not the product of the layer's own tagged calls' "
            "statistics, c·sᵀa/B + α·W + β·b (ALGORITHMS.md §2.1). If its weight is used "
            "outside the layer (a tie by hand such as h @ params['wte']['embedding'].T, a "
            "kernel in a plain jnp matmul), K-FAC's factors miss that use: leave it out of "
            "layers= (e.g. layers=[l for l in grng_jax.find_layers(loss_fn, params, batch) if "
            "...]) so the diagonal preconditions it. If the gradient handed to this optimizer "
            "is not the batch's own (rescaled per leaf: optax.clip_by_block_rms, "
            "adaptive_grad_clip; edited per element; a mean over micro-batches: use "
            "grng_jax.multi_steps, not optax.MultiSteps), the factors are right and K-FAC "
            "preconditions it densely (checked at the first step only).",
            UserWarning, stacklevel=2)
