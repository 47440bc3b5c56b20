"""Host values only where they exist: the core never branches on a traced array.

`concrete_bool(x)` returns Python's bool of a scalar array when the array is concrete (numpy,
torch, cupy, eager jax), and None while it is being traced (jax.jit), so the caller falls back
to `xp.where` with every branch computed. `host_bool(x)` does the same only for arrays that
live in host memory (NumPy, CPU tensors, CPU jax): reading an accelerator's array would stall
its pipeline, so there it returns None too (the per-step non-finite check, ALGORITHMS.md §4).
"""

from __future__ import annotations

import array_api_compat

from grng_core.tree import device


def is_traced(x) -> bool:
    """True for a JAX tracer (inside jit, vmap, grad): its value is not known on the host."""
    # JAX tracers (jit, vmap, grad) all derive from jax.core.Tracer; checking the class names
    # avoids importing jax and avoids bool(), whose error message walks the whole graph
    return any(c.__name__ == "Tracer" for c in type(x).__mro__)


def on_host(x) -> bool:
    """True when reading `x` costs no device-to-host transfer (NumPy, CPU torch / jax /
    array-api-strict arrays); False for accelerator arrays (CUDA, CuPy, other devices)."""
    if array_api_compat.is_numpy_array(x):
        return True
    dev = device(x)
    if array_api_compat.is_torch_array(x):
        return dev.type == "cpu"
    if array_api_compat.is_cupy_array(x):
        return False
    platform = getattr(dev, "platform", None)  # a jax Device
    if platform is not None:
        return platform == "cpu"
    return "CPU" in str(dev).upper()  # array-api-strict's CPU_DEVICE vs its device1, ...


def host_bool(x) -> bool | None:
    """`concrete_bool` for host arrays; None (no conversion) for accelerator arrays."""
    if is_traced(x) or not on_host(x):
        return None
    return concrete_bool(x)


def concrete_bool(x) -> bool | None:
    if is_traced(x):
        return None
    try:
        return bool(x)
    except Exception:  # any other lazy array that refuses conversion
        return None


def branchable(x) -> bool:
    """True when `branch` can pick one side for a predicate like `x` without a device-to-host
    read: host arrays (a Python `if`) and JAX tracers (`lax.cond`)."""
    return is_traced(x) or on_host(x)


def branch(pred, if_true, if_false):
    """if_true() when the 0-d bool `pred` holds, else if_false(); only one side runs: a Python
    `if` for host values, `jax.lax.cond` while tracing (call only where `branchable`)."""
    if is_traced(pred):
        from jax import lax  # only reached when jax is tracing this computation

        return lax.cond(pred, if_true, if_false)
    return if_true() if bool(pred) else if_false()
