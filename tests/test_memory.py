"""Memory of training with the core and the adapters (torch, JAX): resident memory does not
grow with the number of steps after warm-up (< 5 %). The full soak (2,000 steps of RENG with
double backprop in torch, of every optimizer in JAX) is `python -m tests.reliability.memory_soak`;
these are its short variants, each in a fresh subprocess so that other tests' allocations do not
count."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_PCT = 5.0
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="RSS is read from /proc (Linux)")


def soak(*args) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.memory_soak", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(results):
    assert results
    for r in results:
        assert "skipped" not in r or isinstance(r["skipped"], int)
        assert r["growth_pct"] < LIMIT_PCT, r
        assert r.get("skipped", 0) == 0, r  # the soak trains normally: no non-finite steps


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_reng_double_backprop_memory_is_flat():
    modes = "torch-core"
    if importlib.util.find_spec("grng_torch") is not None:
        modes += ",torch-adapter"
    _check([r for r in soak("--steps", "300", "--warmup", "100", "--modes", modes)
            if "growth_pct" in r])


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_jax_every_optimizer_memory_is_flat():
    results = soak("--steps", "200", "--warmup", "60", "--modes", "jax-core",
                   "--ns-max-iter", "8")
    assert {r["run"].split()[1] for r in results} == {"reng", "ring", "rkalman"}
    for r in results:
        assert r["compiled"] == 1, r  # one compiled step: no retrace per step
    _check(results)
