"""Moving arrays between NumPy and any array-API library (host-side, outside the math).

The conversions are the checkpoints' (`grng_core.npz_tree`): one implementation of each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grng_core.npz_tree import place, to_host


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of `x`, whatever its library and device. Not traceable."""
    if isinstance(x, np.ndarray):
        return x
    return to_host(x, "array")


def from_numpy(a: np.ndarray, like: Any) -> Any:
    """`a` as an array of `like`'s library, on its device and with its dtype."""
    return place(a, like)
