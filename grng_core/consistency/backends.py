"""The array backends the consistency run trains on (numpy, array-api-strict, torch, jax, cupy)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def available_backends() -> list[str]:
    """The installed libraries (cupy only with a usable GPU)."""
    out = []
    for name in ALL_BACKENDS:
        if name == "cupy":
            if gpu_available():
                out.append(name)
        elif importlib.util.find_spec(name) is not None:
            out.append(name)
    return out


@dataclass
class Backend:
    name: str
    from_numpy: Any
    to_numpy: Any
    jit: Any = None  # wraps the step function (jax.jit), or None


def backend(name: str) -> Backend:
    from grng_core.reference import to_numpy

    if name == "numpy":
        return Backend(name, lambda a: np.array(a, copy=True), to_numpy)
    if name == "array_api_strict":
        import array_api_strict as xps

        return Backend(name, xps.asarray, to_numpy)
    if name == "torch":
        import torch

        return Backend(name, lambda a: torch.from_numpy(np.array(a, copy=True)), to_numpy)
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # before any jax array is created
        import jax.numpy as jnp

        def jit(fn):
            return jax.jit(fn, static_argnames=("curvature", "inverse"))

        return Backend(name, jnp.asarray, to_numpy, jit)
    if name == "cupy":
        import cupy

        return Backend(name, cupy.asarray, to_numpy)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(ALL_BACKENDS)}")
