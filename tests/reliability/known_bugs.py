"""Core bugs found by the reliability tests, each with a deterministic reproduction.

The strict-xfail tests (tests/test_guard.py, tests/test_linalg_degenerate.py) are the canonical
failing tests. The
property tests, which draw random cases, must not fail on these known bugs while they are
open, nor hide them once fixed: each detector below runs its reproduction once and says
whether the bug is still there; the properties tolerate an outcome (and record a Hypothesis
`event`) only while its detector says so. Once the core is fixed the tolerance switches off
by itself, and the strict-xfail tests XPASS, which tells whoever fixed it to remove them.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

import grng_core as gc
from tests import cases
from tests.reliability.problems import (
    Problem,
    available_backends,
    degenerate_problem,
    is_backend_linalg_error,
)


def _fails(fn) -> bool:
    """True when fn, given finite input, raises the backend's LinAlgError or skips the step
    (the NaN of a failed Cholesky caught by the guard): the bug is still there."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = fn()
    except Exception as e:
        return is_backend_linalg_error(e)
    return state is not None and int(np.asarray(state.skipped)) > 0


@functools.cache
def singular_cholesky() -> bool:
    """Bug: a finite, numerically singular SPD system (float32, damping small next to the
    Gram matrix) reaches xp.linalg.cholesky: LinAlgError (torch, sometimes numpy) or NaN and
    a skipped step (numpy, jax)."""
    def repro():
        params = [np.zeros(3, dtype=np.float32)]
        pe = [np.array([[1.0, 0, 0], [-1.0, 0, 0]], dtype=np.float32)]
        opt = gc.ring(lr=0.1, rho=0.0, damping=1e-12, structure="woodbury")
        return opt.update([np.zeros(3, dtype=np.float32)], opt.init(params), params,
                          stats=gc.Stats(per_example_grads=pe))[1]
    return _fails(repro)


@functools.cache
def rkalman_predict() -> bool:
    """Bug: R-Kalman K-FAC's one-step Newton–Schulz predict diverges when the damping split
    pi changes between steps; the RLS system is then not positive definite."""
    def repro():
        pr = degenerate_problem("params_1e-6", "numpy", "float64")
        opt = cases.get("rkalman/kfac/fin_diff:forward", bare=True).build(damping=1e-3)
        params = pr.params()
        state = pr.init(opt, params)
        for _ in range(3):
            params, state, _ = pr.step(opt, params, state)
        return state
    return _fails(repro)


@functools.cache
def torch_nonfinite_cholesky() -> bool:
    """Bug: non-finite curvature statistics reach torch.linalg.cholesky, which raises."""
    if "torch" not in available_backends():
        return False

    def repro():
        pr = Problem.make("torch")
        opt = gc.ring(structure="woodbury")
        params = pr.params()
        grads, stats, _ = pr.inputs(opt, params)
        pe = list(stats.per_example_grads)
        pe[0] = pe[0].clone()
        pe[0][0, 0, 0] = math.nan
        opt.update(grads, opt.init(params), params, stats=stats._replace(per_example_grads=pe))
    return _fails(repro)


def tolerated(opt, state_dtype: str, exc) -> str | None:
    """The open bug that explains this failure on finite input (`exc`: a backend LinAlgError,
    or the guard's RuntimeWarning turned into an error), or None: a new failure."""
    skipped = isinstance(exc, RuntimeWarning) and "non-finite values" in str(exc)
    if not (skipped or is_backend_linalg_error(exc)):
        return None
    h = opt.config
    if opt.name == "rkalman" and h.structure == "kfac" and rkalman_predict():
        return "known core bug: R-Kalman K-FAC predict loses positive definiteness"
    if state_dtype == "float32" and h.structure in ("kfac", "woodbury") \
            and singular_cholesky():
        return "known core bug: numerically singular system in float32 breaks Cholesky"
    return None
