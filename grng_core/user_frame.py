"""The stacklevel that makes a warning point at the user's code (not at this library's or a
framework's frames): the first frame on the stack outside the packages in `LIBRARY`."""

from __future__ import annotations

import sys

#: Top-level packages whose frames a warning skips: GRNG's own and the frameworks it runs in
#: (a jit trace, an nnx or equinox wrapper, torch.optim's step wrapper, a scheduler).
LIBRARY = frozenset({"grng_core", "grng_jax", "grng_torch", "grng_cupy", "jax", "jaxlib",
                     "flax", "optax", "equinox", "torch", "contextlib", "functools"})


def user_stacklevel() -> int:
    """`warnings.warn(..., stacklevel=user_stacklevel())` from inside the library: the level of
    the first caller outside `LIBRARY` (the outermost frame where every frame is inside it)."""
    frame = sys._getframe(1)  # the function that warns: level 1
    level = 1
    while frame.f_back is not None and _inside(frame):
        frame, level = frame.f_back, level + 1
    return level


def _inside(frame) -> bool:
    return str(frame.f_globals.get("__name__", "")).split(".")[0] in LIBRARY
