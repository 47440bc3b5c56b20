"""Hyperparameters as the optax factories receive them, turned into the core's config fields.

optax hands a factory Python numbers, optax schedules (called with the count of updates already
applied), and, through ``optax.inject_hyperparams``, 0-d jax arrays: concrete at ``init``,
traced inside a jitted ``update``. The core's config records (`grng_core.config`) take Python
numbers, and schedules of the 1-based step t for the fields they mark ``schedulable``. None
means "the core's default" and is dropped.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from grng_core.concrete import is_traced


def concrete_number(name: str, v, integer: bool = False):
    """A Python number from a Python number or a concrete 0-d array (optax.inject_hyperparams
    hands jax arrays to the factory); a traced value of a static hyperparameter is an error."""
    if v is None or isinstance(v, (bool, str, int, float)) or callable(v):
        return v
    if jnp.ndim(v) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(v)}")
    if is_traced(v):
        raise ValueError(
            f"{name} is a traced value: grng_core needs it as a Python number when the optimizer "
            "is built. Only learning_rate, rho, damping and kl_clip may be injected or scheduled; "
            f"with optax.inject_hyperparams pass static_args=({name!r}, ...) for the others")
    arr = jnp.asarray(v)
    return int(arr) if integer or jnp.issubdtype(arr.dtype, jnp.integer) else float(arr)


def schedulable(name: str, v):
    """A schedulable field: a number, an optax-style schedule (called with the count of updates
    already applied, 0 on the first; the core calls schedules with the 1-based step t), or a
    traced value (optax.inject_hyperparams under jit), given to the core as a constant
    schedule."""
    if callable(v):
        return lambda t, _f=v: _f(t - 1)
    if not isinstance(v, (bool, str, int, float)) and v is not None and jnp.ndim(v) == 0 \
            and is_traced(v):
        return lambda t, _v=v: _v
    return concrete_number(name, v)


def core_kwargs(config_cls, kwargs: dict) -> dict:
    """The keyword arguments of the core's builder for `config_cls` (a `grng_core.config`
    record): None keeps the core's default; integer fields are read as ints."""
    ints = {f.name for f in dataclasses.fields(config_cls) if f.type in ("int", int)}
    sched = set(config_cls.schedulable())
    out = {}
    for k, v in kwargs.items():
        if v is None:
            continue
        out[k] = schedulable(k, v) if k in sched else concrete_number(k, v, integer=k in ints)
    return out
