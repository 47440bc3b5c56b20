"""Backends shared by the tests: numpy, array_api_strict, torch (CPU) and jax (float64 on).

`backend` is a fixture parametrized over the installed libraries; each is a `Backend` with
`xp` (the array_api_compat namespace), `asarray(np_array, dtype="float64")` and `to_numpy`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_ENABLE_X64", "1")  # before any jax array is created

import numpy as np
import pytest

from tests.backends import BACKEND_NAMES, get_backend


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    return get_backend(request.param)


@pytest.fixture
def numpy_backend():
    return get_backend("numpy")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def factored_calls(monkeypatch):
    """[n]: how many times `grng_core.structures.factored.apply` (the factored K-FAC product,
    §2.1) ran in the test, counted by a spy around the real function."""
    from grng_core.structures import factored

    count = [0]
    real = factored.apply

    def spy(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(factored, "apply", spy)
    return count
