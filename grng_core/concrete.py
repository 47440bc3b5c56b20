"""Host values only where they exist: the core never branches on a traced array.

`concrete_bool(x)` returns Python's bool of a scalar array when the array is concrete (numpy,
torch, cupy, eager jax), and None while it is being traced (jax.jit), so the caller falls back
to `xp.where` with every branch computed.
"""

from __future__ import annotations


def concrete_bool(x) -> bool | None:
    try:
        return bool(x)
    except Exception:  # a tracer refuses conversion (jax.errors.TracerBoolConversionError)
        return None
