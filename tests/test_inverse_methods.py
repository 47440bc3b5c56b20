"""grng_core.linalg's inverse methods (ALGORITHMS.md §2.1): "newton_schulz", "cholesky" (the
backend's triangular solve, grng_core.triangular), "eigh" and "auto" agree with
numpy.linalg.inv on damped factors, including degenerate ones, on every backend; every
returned inverse is exactly symmetric; failures are NaN (non-finite input) or InverseError."""

from __future__ import annotations

import math

import numpy as np
import pytest

import grng_core as gc
from grng_core.linalg import eigh_inverse, resolve_method, spd_inverse
from tests.backends import BACKEND_NAMES, get_backend

METHODS = ("newton_schulz", "cholesky", "eigh", "auto")


def _factors():
    """Damped K-FAC-like factors: full rank, rank-deficient (n < d), huge scale spread, a
    nearly constant input column (bias-like), and a diagonal one."""
    rng = np.random.default_rng(0)
    d = 12
    a = rng.standard_normal((40, d))
    low = rng.standard_normal((3, d))
    spread = a * np.logspace(-3, 3, d)
    const = np.concatenate([a[:, :-1], np.ones((40, 1))], axis=1)
    out = {}
    for name, rows in (("full", a), ("n<d", low), ("spread", spread), ("const", const)):
        A = rows.T @ rows / rows.shape[0]
        out[name] = A + 1e-3 * np.trace(A) / d * np.eye(d)
    out["diagonal"] = np.diag(np.logspace(-4, 2, d))
    return out


FACTORS = _factors()


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(FACTORS))
def test_inverse_matches_numpy_and_is_symmetric(backend_name, method, case):
    be = get_backend(backend_name)
    M = FACTORS[case]
    X = be.to_numpy(spd_inverse(be.asarray(M), be.xp, method=method, tol=1e-12,
                                max_iter=200))
    ref = np.linalg.inv(M)
    cond = np.linalg.cond(M)
    assert np.linalg.norm(X - ref) / np.linalg.norm(ref) <= 1e-13 * cond
    np.testing.assert_array_equal(X, X.T)  # exact: (X + Xᵀ)/2 is symmetric in IEEE


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_eigh_shift_is_the_damped_inverse(backend_name):
    """One decomposition serves every damping δ: (A + δI)⁻¹ = Q diag(1/(e + δ)) Qᵀ."""
    be = get_backend(backend_name)
    A = FACTORS["n<d"] - 1e-3 * np.trace(FACTORS["n<d"]) / 12 * np.eye(12)  # undamped, singular
    for delta in (1e-4, 1e-1, 10.0):
        X = be.to_numpy(eigh_inverse(be.asarray(A), be.xp, shift=delta))
        ref = np.linalg.inv(A + delta * np.eye(12))
        assert np.linalg.norm(X - ref) / np.linalg.norm(ref) < 1e-9


def test_auto_is_cholesky_with_linalg():
    be = get_backend("numpy")
    assert resolve_method("auto", be.xp) == "cholesky"
    assert resolve_method("eigh", be.xp) == "eigh"


@pytest.mark.parametrize("method", ("cholesky", "eigh"))
def test_failures_are_nan_or_inverse_error(method):
    be = get_backend("numpy")
    bad = FACTORS["full"].copy()
    bad[0, 0] = math.nan
    X = spd_inverse(be.asarray(bad), be.xp, method=method, tol=1e-6, max_iter=10)
    assert np.isnan(np.asarray(X)).all()
    singular = np.ones((4, 4))  # finite, rank one, no damping
    with pytest.raises(gc.InverseError):
        spd_inverse(be.asarray(singular), be.xp, method=method, tol=1e-6, max_iter=10)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_the_same(method):
    """The optimizer's result does not depend on the inverse method beyond its tolerance."""
    from grng_core.reference import MLP
    from tests.helpers import train

    be = get_backend("numpy")
    rng = np.random.default_rng(1)
    mlp = MLP((6, 5, 3), activation="tanh", loss="softmax_ce")
    x, y = rng.standard_normal((16, 6)), np.eye(3)[rng.integers(0, 3, 16)]
    ref_opt = gc.ring(lr=0.1, damping=1e-2, inverse_method="cholesky")
    opt = gc.ring(lr=0.1, damping=1e-2, inverse_method=method, ns_tol=1e-12)
    want, _, _ = train(be, mlp, ref_opt, x, y, 5)
    got, _, _ = train(be, mlp, opt, x, y, 5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
