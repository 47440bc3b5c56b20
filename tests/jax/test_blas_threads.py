"""grng_core.blas_threads: the first JAX decomposition traced for the CPU sets the BLAS SciPy
ships (the one jaxlib's LAPACK kernels call) to GRNG_JAX_LAPACK_THREADS threads (default 1),
leaves NumPy's BLAS alone, and leaves everything alone with GRNG_JAX_LAPACK_THREADS=0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grng_core import blas_threads

pytest.importorskip("threadpoolctl")
pytest.importorskip("scipy")

PROBE = """
import json, jax.numpy as jnp, numpy as np
from threadpoolctl import threadpool_info
from grng_core import blas_threads, lapack
import scipy.linalg.cython_lapack
before = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
lapack.cholesky(jnp.eye(3) * 2.0, jnp).block_until_ready()
after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
scipy_own = [c.filepath for c in blas_threads.scipy_blas_controllers()]
print(json.dumps({"before": before, "after": after, "scipy_own": scipy_own}))
"""


def _probe(env_value):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}  # the libraries' defaults
    env["JAX_PLATFORMS"] = "cpu"
    if env_value is None:
        env.pop(blas_threads.ENV, None)
    else:
        env[blas_threads.ENV] = env_value
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "adapters"),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value, want", [(None, 1), ("2", 2), ("0", None)])
def test_scipy_blas_threads_follow_the_setting_and_numpy_is_untouched(value, want):
    r = _probe(value)
    if not r["scipy_own"]:
        pytest.skip("this SciPy ships no BLAS of its own (e.g. a conda install): nothing to set")
    for path in r["scipy_own"]:
        expected = r["before"][path] if want is None else want
        assert r["after"][path] == expected
    for path, n in r["before"].items():  # NumPy's (or any other) BLAS keeps its threads
        if path not in r["scipy_own"]:
            assert r["after"][path] == n


@pytest.mark.parametrize("raw, want", [("1", 1), (" 4 ", 4), ("0", None), ("off", None),
                                       ("", None)])
def test_requested_reads_the_variable(monkeypatch, raw, want):
    monkeypatch.setenv(blas_threads.ENV, raw)
    assert blas_threads.requested() == want


@pytest.mark.parametrize("raw", ["one", "-2"])
def test_a_bad_value_names_the_variable_and_the_fix(monkeypatch, raw):
    monkeypatch.setenv(blas_threads.ENV, raw)
    with pytest.raises(ValueError, match="GRNG_JAX_LAPACK_THREADS.*0 / off"):
        blas_threads.requested()
