"""The R-Kalman kfac belief's RLS correction (ALGORITHMS.md §3.3 step 2) in blocks of
`rls_block` rows, and after a QR compression for n > 8d, equals the dense float64 inverse
(F + c·aᵀa)⁻¹ of the factor it corrects, for n below, at and above the width."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from grng_core import kalman
from grng_core.context import StepContext


def _ctx(xp):
    return StepContext(xp=xp, sdtype=xp.float64, device=None, t=1, first=False, curvature=True,
                       inverse=False, steady=None, mean=None, gather=None, tol=1e-10,
                       max_iter=50, method="auto", replicated=False, incidents=None,
                       replicas=1)


def test_block_rule():
    assert kalman.rls_block(1025, 1024) == 257
    assert kalman.rls_block(100, 1000) == 64
    assert kalman.rls_block(1025, 100) == 100  # one block of all the rows
    assert kalman.rls_block(8, 0) == 1


@pytest.mark.parametrize("d, n", [(40, 10), (40, 40), (70, 200), (70, 300), (20, 400)],
                         ids=["n<d", "n=d", "blocks", "blocks-tail", "qr"])
def test_blocked_correction_equals_the_dense_inverse(d, n):
    xp = array_api_compat.array_namespace(np.zeros(1))
    rng = np.random.default_rng(d + n)
    X = rng.standard_normal((3 * d, d))
    F = X.T @ X / (3 * d) + 0.1 * np.eye(d)
    a = rng.standard_normal((n, d))
    c = 0.05 / n
    P = np.linalg.inv(F)
    got = kalman._correct((P + P.T) / 2, a, c, _ctx(xp), "test")
    want = np.linalg.inv(F + c * a.T @ a)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)
