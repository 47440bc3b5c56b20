"""Portable checkpoints of the JAX state through grng_core's framework-neutral ``.npz``.

Any pytree checkpointer (orbax, flax.serialization, ...) saves a :class:`GRNGState` as it is;
these helpers write the core's portable file instead (no pickle, atomic, with a format
version), which NumPy and the other backends' tools read too (``grng_core.load_state``).
"""

from __future__ import annotations

import jax
import numpy as np

import grng_core as gc
from grng_jax._optax import GRNGState

ADAPTER = "grng_jax"


def save_state(path, state: GRNGState, *, extra: dict | None = None) -> None:
    """Write ``state.core`` with grng_core.save_state; the PRNG key goes into the metadata."""
    if not isinstance(state, GRNGState):
        raise TypeError("save_state needs the GRNGState of a grng_jax optimizer")
    key = [int(k) for k in np.asarray(jax.device_get(state.key)).ravel()]
    gc.save_state(path, state.core, extra={"adapter": ADAPTER, "key": key, **(extra or {})})


def load_state(path, like: GRNGState) -> GRNGState:
    """The state saved at `path`, as jax arrays shaped and typed like the template `like`
    (e.g. ``opt.init(params)``); ValueError when the file does not match it."""
    if not isinstance(like, GRNGState):
        raise TypeError("load_state needs a GRNGState template: opt.init(params)")
    core = gc.load_state(path, like=like.core)
    extra = gc.read_metadata(path).get("extra") or {}
    key = like.key
    if isinstance(extra.get("key"), list) and len(extra["key"]) == like.key.size:
        key = jax.numpy.asarray(np.asarray(extra["key"], dtype=np.uint32).reshape(like.key.shape))
    return GRNGState(core=core, key=key)
