"""Array backends for the tests, each converting from and to NumPy."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("JAX_ENABLE_X64", "1")


@dataclass(frozen=True)
class Backend:
    name: str
    xp: Any
    _from_numpy: Callable
    to_numpy: Callable
    device: Any = None

    def asarray(self, a, dtype: str = "float64"):
        return self._from_numpy(np.asarray(a, dtype=dtype))

    def tree(self, tree, dtype: str = "float64"):
        if isinstance(tree, dict):
            return {k: self.asarray(v, dtype) for k, v in tree.items()}
        return type(tree)(self.asarray(v, dtype) for v in tree)

    def tree_numpy(self, tree):
        if isinstance(tree, dict):
            return {k: self.to_numpy(v) for k, v in tree.items()}
        return type(tree)(self.to_numpy(v) for v in tree)


def _installed(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def get_backend(name: str) -> Backend:
    import array_api_compat

    if name == "numpy":
        return Backend("numpy", array_api_compat.array_namespace(np.zeros(1)), np.asarray,
                       np.asarray)
    if name in ("array_api_strict", "array_api_strict_device1"):
        import array_api_strict as xps

        dev = xps.Device("device1") if name.endswith("device1") else None
        def from_np(a):
            x = xps.asarray(a)
            return x if dev is None else xps.asarray(x, device=dev)
        def to_np(x):
            if dev is not None:
                x = xps.asarray(x, device=xps.Device("CPU_DEVICE"))
            return np.asarray(x)
        return Backend(name, xps, from_np, to_np, dev)
    if name == "torch":
        import torch

        return Backend("torch", array_api_compat.array_namespace(torch.zeros(1)),
                       torch.from_numpy, lambda x: x.detach().cpu().numpy())
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return Backend("jax", jnp, jnp.asarray, np.asarray)
    raise ValueError(name)


BACKEND_NAMES = [
    n for n, mod in (("numpy", "numpy"), ("array_api_strict", "array_api_strict"),
                     ("torch", "torch"), ("jax", "jax")) if _installed(mod)
]
