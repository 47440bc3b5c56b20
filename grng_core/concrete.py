"""Host values only where they exist: the core never branches on a traced array.

`concrete_bool(x)` returns Python's bool of a scalar array when the array is concrete (numpy,
torch, cupy, eager jax), and None while it is being traced (jax.jit), so the caller falls back
to `xp.where` with every branch computed.
"""

from __future__ import annotations


def is_traced(x) -> bool:
    """True for a JAX tracer (inside jit, vmap, grad): its value is not known on the host."""
    # JAX tracers (jit, vmap, grad) all derive from jax.core.Tracer; checking the class names
    # avoids importing jax and avoids bool(), whose error message walks the whole graph
    return any(c.__name__ == "Tracer" for c in type(x).__mro__)


def concrete_bool(x) -> bool | None:
    if is_traced(x):
        return None
    try:
        return bool(x)
    except Exception:  # any other lazy array that refuses conversion
        return None
