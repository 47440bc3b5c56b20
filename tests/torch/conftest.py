"""Shared setup of the torch adapter tests: import path, threads, determinism."""

from __future__ import annotations

import os
import sys

_ADAPTERS = os.path.join(os.path.dirname(__file__), "..", "..", "adapters")
try:  # the installed package (pip install -e .) wins; a plain checkout uses adapters/
    import grng_torch  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(_ADAPTERS))

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny models: one intra-op thread is fastest, and on a busy 2-core machine far faster
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
