"""Crash and resume with grng_core.checkpoint: a training run killed with SIGKILL at a random
step, resumed from its last checkpoint, continues bit-identically to a run that was never
killed; the checkpoint is written atomically (temporary file, then rename), so a kill in the
middle of a write leaves the previous checkpoint intact.

The run is tests/reliability/train_run.py (the reference MLP with the NumPy core), in a
subprocess; it checkpoints with grng_core.checkpoint (tests/reliability/atomic_npz.py when
that module is absent). The random kill steps are printed in every assertion message.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.reliability import train_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(directory, config, *, every=1, kill_after=None, kill_on="step", extra=()):
    """Run train_run.py; with kill_after=k, SIGKILL it right after it prints `{kill_on} k`.
    Returns (printed lines, return code)."""
    cmd = [sys.executable, "-m", "tests.reliability.train_run", "--dir", str(directory),
           "--config", config, "--steps", str(STEPS), "--every", str(every), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            words = line.split()
            if kill_after is not None and words[:2] == [kill_on, str(kill_after)]:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    proc.stderr.close()
    proc.stdout.close()
    if kill_after is None:
        assert proc.returncode == 0, err
    return lines, proc.returncode


def digests(lines) -> dict[int, str]:
    return {int(w[1]): w[2] for w in (ln.split() for ln in lines) if w[0] == "step"}


def final_arrays(directory) -> dict[str, np.ndarray]:
    with np.load(os.path.join(directory, "final.npz"), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def assert_same_final(a, b, msg):
    fa, fb = final_arrays(a), final_arrays(b)
    assert sorted(fa) == sorted(fb), msg
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, (k, msg)
        assert fa[k].tobytes() == fb[k].tobytes(), f"{k} differs: {msg}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per configuration: {config: (directory, step digests)}."""
    cache = {}

    def get(config):
        if config not in cache:
            d = tmp_path_factory.mktemp(f"ref-{config}")
            lines, _ = run(d, config)
            cache[config] = (d, digests(lines))
        return cache[config]

    return get


CONFIGS = list(train_run.CONFIGS)  # rows of tests/cases.py with the run's hyperparameters


@pytest.mark.parametrize("config", CONFIGS)
def test_killed_twice_and_resumed_is_bit_identical(config, reference, tmp_path):
    ref_dir, ref = reference(config)
    rng = random.SystemRandom()
    every = 3
    k1 = rng.randint(2, STEPS // 2)
    k2 = rng.randint(k1 + 2, STEPS - 1)
    msg = f"config={config} kill steps {k1}, {k2} (checkpoint every {every})"
    lines1, rc1 = run(tmp_path, config, every=every, kill_after=k1)
    assert rc1 == -signal.SIGKILL, msg
    assert not os.path.exists(tmp_path / "final.npz"), msg
    lines2, rc2 = run(tmp_path, config, every=every, kill_after=k2)
    assert rc2 == -signal.SIGKILL, msg
    lines3, _ = run(tmp_path, config, every=every)
    for lines, killed_at in ((lines2, k1), (lines3, k2)):
        first = lines[0].split()
        resumed = int(first[1]) if first[0] == "resumed" else 0  # else "fresh": no ckpt yet
        # the last checkpoint written before the kill landed: at or after the last one at or
        # before step k (the child runs on while the parent reads its line and signals it; on
        # a loaded machine it wrote step 9's after printing step 7 in one CI run), and one of
        # the checkpoint steps
        previous = killed_at - (killed_at % every or every)
        assert resumed >= previous and (resumed % every == 0 or resumed == STEPS), (
            lines[0], msg)
    # every step any of the three processes printed matches the uninterrupted run
    for lines in (lines1, lines2, lines3):
        for step, d in digests(lines).items():
            assert d == ref[step], f"step {step} diverged from the uninterrupted run: {msg}"
    assert max(digests(lines3)) == STEPS
    assert_same_final(ref_dir, tmp_path, msg)
    # a kill that lands inside a write leaves its temporary file (nothing can clean up after
    # SIGKILL; it is never read); completed writes leave none
    assert not glob.glob(str(ref_dir / ".*.tmp")), "a completed write left its temporary file"


@pytest.mark.parametrize("config", ["reng-kfac", "rkalman-kfac"])
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(config, reference, tmp_path):
    """SIGKILL between writing the temporary file and renaming it: the checkpoint on disk is
    the previous complete one, it loads, and the resumed run is bit-identical."""
    ref_dir, ref = reference(config)
    every = 2
    k = random.SystemRandom().choice(range(2 * every, STEPS - 1, every))
    msg = f"config={config} killed while writing the checkpoint of step {k}"
    lines, rc = run(tmp_path, config, every=every, kill_after=k, kill_on="renaming",
                    extra=("--pause-before-rename", str(k)))
    assert rc == -signal.SIGKILL, msg
    assert glob.glob(str(tmp_path / ".ckpt.npz.*.tmp")), f"no temporary file left: {msg}"
    lines2, _ = run(tmp_path, config, every=every)
    assert lines2[0].startswith(f"resumed {k - every} "), (lines2[0], msg)
    for step, d in digests(lines2).items():
        assert d == ref[step], f"step {step} diverged: {msg}"
    assert_same_final(ref_dir, tmp_path, msg)


def test_atomic_npz_fallback_writer_resumes_bit_identically(reference, tmp_path):
    """The test's own writer (used when grng_core.checkpoint is absent) resumes the same way."""
    ref_dir, ref = reference("reng-kfac")
    k = random.SystemRandom().randint(3, STEPS - 3)
    extra = ("--writer", "atomic_npz")
    _, rc = run(tmp_path, "reng-kfac", every=2, kill_after=k, extra=extra)
    assert rc == -signal.SIGKILL
    lines, _ = run(tmp_path, "reng-kfac", every=2, extra=extra)
    assert "atomic_npz" in lines[0]
    for step, d in digests(lines).items():
        assert d == ref[step], f"step {step} diverged (kill at {k})"
    assert_same_final(ref_dir, tmp_path, f"kill at {k}")
