"""The cross-backend consistency suite (python -m grng_core.consistency): a small in-process
run meets the float64 contract (1e-10) and the float32 bound; the command exits non-zero when a
tolerance is violated or a backend fails."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from grng_core import consistency as C
from tests.backends import BACKEND_NAMES

# one configuration per structure and estimator kind, kept small for the test budget
SMALL = ["ring/kfac/-", "reng/woodbury/double_bp", "reng/diagonal/fin_diff",
         "rkalman/kfac/fin_diff", "rkalman/woodbury/double_bp"]


def _configs(labels):
    by_label = {c.label: c for c in C.default_configs()}
    return [by_label[k] for k in labels]


def test_default_configs_cover_every_combination():
    labels = [c.label for c in C.default_configs()]
    assert len(labels) == len(set(labels)) == 18
    assert sum(lab.startswith("ring/") for lab in labels) == 6  # RING: no estimator, 2 forms
    for opt in ("reng", "rkalman"):
        for s in ("kfac", "diagonal", "woodbury"):
            for e in ("double_bp", "fin_diff"):
                assert f"{opt}/{s}/{e}" in labels


def test_small_run_float64_within_contract():
    backends = [b for b in BACKEND_NAMES if b != "jax"]
    report = C.run(backends, _configs(SMALL), steps=4, dtype="float64", hidden=6,
                   batch_size=8)
    assert not report.errors, report.errors
    assert report.passed, report.table()
    worst, _, _ = report.worst
    assert worst <= C.FLOAT64_TOL
    if "array_api_strict" in backends:  # NumPy kernels underneath both: agree to round-off
        # (not bit for bit: the two namespaces may call different NumPy functions, e.g. einsum
        # vs matmul, whose summation order depends on the CPU's SIMD kernels, and Cholesky
        # inverses take SciPy's triangular solve for NumPy, the general solve for strict)
        assert report.diffs["ring/kfac/-"][("numpy", "array_api_strict")] <= 1e-13
    table = report.table()
    assert "numpy|torch" in table and "rkalman/kfac/fin_diff" in table


@pytest.mark.skipif("jax" not in BACKEND_NAMES, reason="jax not installed")
def test_small_run_with_jit_jax():
    report = C.run(["numpy", "jax"], _configs(["rkalman/diagonal/fin_diff"]), steps=3,
                   hidden=4, batch_size=6)
    assert report.passed, report.summary()


@pytest.mark.skipif("torch" not in BACKEND_NAMES, reason="torch not installed")
def test_small_run_float32_within_bound():
    report = C.run(["numpy", "torch"], _configs(["ring/kfac/-", "rkalman/woodbury/fin_diff"]),
                   steps=4, dtype="float32", hidden=6, batch_size=8)
    assert report.tol == C.FLOAT32_TOL
    assert report.passed, report.table()
    assert report.worst[0] > 0.0  # float32 rounding does differ between libraries


def test_compare_catches_a_difference_and_nonfinite():
    a = ([[np.ones(3)]], {"step": np.ones(())})
    b = ([[np.ones(3) * (1 + 1e-8)]], {"step": np.ones(())})
    assert 1e-9 < C.compare(a, b) < 1e-7
    nan = ([[np.array([1.0, np.nan, 1.0])]], {"step": np.ones(())})
    assert math.isinf(C.compare(a, nan))
    other_keys = ([[np.ones(3)]], {"skipped": np.ones(())})
    assert math.isinf(C.compare(a, other_keys))


def test_a_failing_backend_fails_the_report(monkeypatch):
    real = C.train

    def flaky(backend, config, problem):
        if backend == "array_api_strict":
            raise RuntimeError("simulated backend failure")
        return real(backend, config, problem)

    monkeypatch.setattr(C.report, "train", flaky)  # where run() looks it up
    report = C.run(["numpy", "array_api_strict"], _configs(["ring/diagonal/-"]), steps=2,
                   hidden=4, batch_size=6)
    assert not report.passed
    assert math.isinf(report.worst[0])
    assert "simulated backend failure" in report.summary()


def test_cli_passes_and_fails_on_a_tiny_tolerance(capsys):
    args = ["--quick", "--steps", "2", "--backends", "numpy,torch", "--optimizers", "ring"]
    if "torch" not in BACKEND_NAMES:
        pytest.skip("torch not installed")
    assert C.main(args) == 0
    out = capsys.readouterr().out
    assert "numpy|torch" in out and ": OK" in out
    assert C.main([*args, "--tol", "1e-300"]) == 1  # numpy and torch round differently
    assert "FAILED" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        C.main(["--backends", "numpy,fortran"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        C.main(["--optimizers", "adam"])
    assert "unknown" in capsys.readouterr().err


@pytest.mark.skipif("torch" not in BACKEND_NAMES, reason="torch not installed")
def test_python_dash_m_exit_status():
    """The real command line: `python -m grng_core.consistency` exits 1 above tolerance."""
    cmd = [sys.executable, "-m", "grng_core.consistency", "--quick", "--steps", "1",
           "--backends", "numpy,torch", "--optimizers", "ring", "--tol", "1e-300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout and "ring/kfac/-" in res.stdout
