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
