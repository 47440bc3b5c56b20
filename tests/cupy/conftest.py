"""Shared setup of the CuPy adapter tests: import path and the array-library fixture.

Every test runs with NumPy arrays (the CPU stack grng_cupy also serves) and with CuPy arrays;
the CuPy runs are skipped, with the reason, where CuPy or a CUDA GPU is missing.
"""

from __future__ import annotations

import os
import sys

_ADAPTERS = os.path.join(os.path.dirname(__file__), "..", "..", "adapters")
try:  # the installed package (pip install -e .) wins; a plain checkout uses adapters/
    import grng_cupy  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(_ADAPTERS))

import pytest  # noqa: E402


def cupy_skip_reason() -> str | None:
    """None when CuPy and a CUDA GPU are usable, else why not."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda12x on a machine with a GPU)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no runtime
        return f"CuPy cannot reach a CUDA GPU ({type(e).__name__}: {e})"
    return None if n > 0 else "CuPy sees no CUDA GPU"


CUPY_SKIP = cupy_skip_reason()
LIBRARIES = ["numpy", pytest.param("cupy", marks=pytest.mark.skipif(
    CUPY_SKIP is not None, reason=str(CUPY_SKIP)))]


@pytest.fixture(params=LIBRARIES)
def xp(request):
    """The array module under test: numpy, or cupy (skipped without a GPU)."""
    if request.param == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy
