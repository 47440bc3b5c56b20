"""Newton–Schulz inverses against numpy.linalg.inv (ALGORITHMS.md §2.1)."""

import numpy as np
import pytest

from grng_core import linalg
from tests.helpers import rel_err


def spd(rng, d, cond):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.logspace(0, -np.log10(cond), d)) @ q.T


@pytest.mark.parametrize("cond", [1e1, 1e3, 1e5])
def test_cold_start_reaches_inverse(backend, rng, cond):
    M = spd(rng, 12, cond)
    tol = 1e-12 * cond  # the round-off floor of ‖I − MX‖ grows with the condition number
    X, r = linalg.newton_schulz_inverse(backend.asarray(M), backend.xp, tol=tol, max_iter=100,
                                        fallback=False)
    assert float(backend.to_numpy(r)) <= tol
    assert rel_err(backend.to_numpy(X), np.linalg.inv(M)) < 10 * tol
    Xn = backend.to_numpy(X)
    assert np.array_equal(Xn, Xn.T)


def test_warm_start_needs_fewer_iterations(numpy_backend, rng):
    xp = numpy_backend.xp
    M = spd(rng, 10, 1e3)
    M2 = M + 1e-6 * np.eye(10)  # a factor that moved a little since the last refresh
    warm, _ = linalg.newton_schulz_inverse(M, xp, tol=1e-12, max_iter=100)
    # with a 4-iteration budget only the warm start converges
    Xw, rw = linalg.newton_schulz_inverse(M2, xp, warm=warm, tol=1e-10, max_iter=4,
                                          fallback=False)
    Xc, rc = linalg.newton_schulz_inverse(M2, xp, tol=1e-10, max_iter=4, fallback=False)
    assert rw <= 1e-10 < rc
    assert rel_err(Xw, np.linalg.inv(M2)) < 1e-7


def test_bad_warm_start_is_replaced_by_cold_start(numpy_backend, rng):
    M = spd(rng, 8, 10)
    X, r = linalg.newton_schulz_inverse(M, numpy_backend.xp, warm=100 * np.eye(8), tol=1e-12,
                                        max_iter=60)
    assert r <= 1e-12
    assert rel_err(X, np.linalg.inv(M)) < 1e-10


def test_unconverged_falls_back_to_cholesky(backend, rng):
    M = spd(rng, 10, 1e6)
    X, r = linalg.newton_schulz_inverse(backend.asarray(M), backend.xp, tol=1e-10, max_iter=3)
    assert float(backend.to_numpy(r)) > 1e-10  # the iteration itself did not get there
    assert rel_err(backend.to_numpy(X), np.linalg.inv(M)) < 1e-6


def test_unconverged_without_linalg_raises(numpy_backend, rng, monkeypatch):
    monkeypatch.setattr(linalg, "has_linalg", lambda xp: False)
    M = spd(rng, 10, 1e6)
    with pytest.raises(linalg.InverseError, match=r"layer 'w'.*condition estimate"):
        linalg.newton_schulz_inverse(M, numpy_backend.xp, tol=1e-10, max_iter=3, name="layer 'w'")


def test_cholesky_method_matches_newton_schulz(backend, rng):
    M = backend.asarray(spd(rng, 9, 1e2))
    a = linalg.spd_inverse(M, backend.xp, method="cholesky", tol=1e-12, max_iter=60)
    b = linalg.spd_inverse(M, backend.xp, method="newton_schulz", tol=1e-12, max_iter=60)
    assert rel_err(backend.to_numpy(a), backend.to_numpy(b)) < 1e-9


def test_traced_budget_equals_eager_early_stop(rng):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    M = spd(rng, 10, 1e3)
    eager, _ = linalg.newton_schulz_inverse(M, np, tol=1e-9, max_iter=60)
    traced = jax.jit(lambda m: linalg.newton_schulz_inverse(m, jnp, tol=1e-9, max_iter=60)[0])
    assert rel_err(np.asarray(traced(jnp.asarray(M))), eager) < 1e-12
