"""Hyperparameter validation and schedules (ALGORITHMS.md, Notation and §1–§3).

Every check runs when the optimizer is built and raises ValueError naming the parameter,
its value and the allowed range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

STRUCTURES = ("kfac", "diagonal", "woodbury")
ESTIMATORS = ("double_backprop", "finite_difference")
FD_SCHEMES = ("forward", "backward", "central")
FISHERS = ("empirical", "mc")
INVERSE_METHODS = ("newton_schulz", "cholesky")
ON_NONFINITE = ("skip", "raise")
STATE_DTYPES = (None, "float32", "float64")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"invalid {name}={value!r}: allowed {allowed}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _bad(name, value, "a finite real number")
    return float(value)


def check_range(name, value, low=None, high=None, low_open=False, high_open=False):
    """A finite number in [low, high] (open ends where asked); returns it as float."""
    v = _number(name, value)
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not (lo_ok and hi_ok):
        lb = "-inf" if low is None else f"{low}"
        hb = "inf" if high is None else f"{high}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        rng = f"{left}{lb}, {hb}{right}"
        raise _bad(name, value, f"a number in {rng}")
    return v


def check_scheduled(name, value, low=None, low_open=False):
    """A number in range, or a callable of the step count (a schedule), checked at t = 1."""
    if callable(value):
        try:
            first = float(value(1))
        except Exception:  # a schedule that only takes arrays: checked when it runs
            return value
        check_range(f"{name}(t=1)", first, low=low, low_open=low_open)
        return value
    return check_range(name, value, low=low, low_open=low_open)


def check_choice(name, value, choices):
    if value not in choices:
        raise _bad(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise _bad(name, value, f"an integer >= {low}")
    return int(value)


def value_at(h: float | Callable, t):
    """The hyperparameter at step t (a schedule is called with the step-count array)."""
    return h(t) if callable(h) else h


def is_static_zero(h) -> bool:
    """True when h is the constant 0 (not a schedule): its term can be skipped statically."""
    return not callable(h) and h == 0.0
