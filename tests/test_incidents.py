"""Failures stay local (grng_core.incidents): a matrix that is not numerically positive
definite on the host gets the smallest extra damping τ of RESCUE_SHIFTS·tr/d that factorises,
reported to the rescue callable; an R-Kalman belief whose RLS innovation system does not
factorise is refreshed from its damped factor. References: numpy.linalg.inv."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import grng_core as gc
from grng_core import kalman, linalg
from grng_core.context import StepContext
from grng_core.incidents import Incidents
from tests.backends import get_backend

BE = get_backend("numpy")


def test_cholesky_rescue_adds_the_smallest_shift_that_factorises():
    M = np.ones((4, 4))  # finite, rank one: the Cholesky factorisation fails
    seen = []
    X = linalg.cholesky_inverse(BE.asarray(M), BE.xp, "M", rescue=seen.append)
    assert seen == [1e-6]  # tr(M)/d = 1, the first shift factorises
    np.testing.assert_allclose(np.asarray(X), np.linalg.inv(M + 1e-6 * np.eye(4)), rtol=1e-6)
    assert np.array_equal(np.asarray(X), np.asarray(X).T)
    with pytest.raises(gc.InverseError):  # without a rescue: the documented loud failure
        linalg.cholesky_inverse(BE.asarray(M), BE.xp, "M")


def test_eigh_rescue_and_an_exhausted_rescue():
    M = np.diag([1.0, 0.0, 0.0])
    seen = []
    X = linalg.eigh_inverse(BE.asarray(M), BE.xp, rescue=seen.append)
    tau = 1e-6 / 3
    assert seen == [pytest.approx(tau)]
    np.testing.assert_allclose(np.asarray(X), np.linalg.inv(M + tau * np.eye(3)), rtol=1e-9)
    bad = np.diag([1.0, -10.0])  # no shift up to tr/d·1 makes it positive definite
    seen.clear()
    X = linalg.cholesky_inverse(BE.asarray(bad), BE.xp, rescue=seen.append)
    assert seen == [] and np.isnan(np.asarray(X)).all()  # NaN: the step is skipped


def test_incidents_count_and_warn_once_per_factor():
    log = Incidents(name_of=lambda w: f"'layer{w}'")
    record = log.rescue(3, "A", 3)
    with pytest.warns(RuntimeWarning, match="factor A of layer 'layer3'"):
        record(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record(0.25)  # counted, not warned again
    (inc,) = log.entries()
    assert (inc.layer, inc.factor, inc.kind, inc.refreshes, inc.extra_damping) == \
        ("'layer3'", "A", "extra damping", 2, 0.25)


def _ctx(incidents):
    xp = BE.xp
    return StepContext(xp=xp, sdtype=xp.float64, device=None, t=2, first=False,
                       curvature=True, inverse=False, mean=None, gather=None, tol=1e-10,
                       max_iter=50, method="cholesky", incidents=incidents)


def test_rkalman_belief_refreshed_where_the_correction_fails(monkeypatch):
    """A correction whose innovation system did not factorise (NaN: rounding made the belief
    indefinite, float32) is replaced by (F_new)⁻¹ of the carried damped factor, counted."""
    rng = np.random.default_rng(0)
    d = 5
    F_prev = np.eye(d) * 2.0
    P_bad = np.linalg.inv(F_prev)
    rows = rng.normal(size=(3, d)) * 10
    monkeypatch.setattr(kalman, "_correct", lambda P, *a: P * np.nan)
    log = Incidents()
    F_new, P = kalman._predict_correct(
        BE.asarray(F_prev), BE.asarray(P_bad), BE.asarray(rows), 3, 0.1, BE.asarray(0.9), 1,
        _ctx(log), "A of layer 0", lambda kind: log.rescue(0, "A", 0, kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.linalg.inv(np.asarray(F_new))
    np.testing.assert_allclose(np.asarray(P), want, rtol=1e-10)
    M = 0.9 * F_prev + 0.1 * 0.1 * np.eye(d)
    np.testing.assert_allclose(np.asarray(F_new), M + (0.1 / 3) * rows.T @ rows, rtol=1e-12)
    assert [i.kind for i in log.entries()] == ["belief refreshed"]
