"""Moving arrays between NumPy and any array-API library (host-side, outside the math)."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of `x`, whatever its library and device. Not traceable."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    xp = array_api_compat.array_namespace(x)
    if array_api_compat.is_array_api_strict_namespace(xp):
        x = xp.asarray(x, device=xp.Device("CPU_DEVICE"))
    return np.asarray(x)


def from_numpy(a: np.ndarray, like: Any) -> Any:
    """`a` as an array of `like`'s library, on its device and with its dtype."""
    xp = array_api_compat.array_namespace(like)
    out = xp.asarray(np.ascontiguousarray(a), device=array_api_compat.device(like))
    return out if out.dtype == like.dtype else xp.astype(out, like.dtype)
