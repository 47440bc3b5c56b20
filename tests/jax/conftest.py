"""JAX adapter tests: float64 on (tests/conftest.py sets JAX_ENABLE_X64=1 before jax loads).

grng_jax lives in adapters/grng_jax; when the project is not installed (pip install -e .),
the adapters folder is put on sys.path so that the tests run from a plain checkout. Without
jax and optax the folder is not collected.
"""

from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("JAX_ENABLE_X64", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADAPTERS = os.path.join(ROOT, "adapters")

if importlib.util.find_spec("jax") is None or importlib.util.find_spec("optax") is None:
    collect_ignore_glob = ["*.py"]
else:
    if importlib.util.find_spec("grng_jax") is None:
        sys.path.insert(0, ADAPTERS)

    import jax

    jax.config.update("jax_enable_x64", True)
