"""Inverses of symmetric positive definite matrices (ALGORITHMS.md §2.1, §2.3).

`newton_schulz_inverse`: Newton's iteration X_{k+1} = X_k (2I - M X_k), matmul only, warm or
cold started, with a fixed iteration budget (a converged X is frozen with `xp.where`, so a
traced run and an eager run that stops early give the same X), then symmetrised; when it has
not reached the tolerance it falls back to a Cholesky inverse, or raises `InverseError`.
"""

from __future__ import annotations

import math

from grng_core import lapack
from grng_core.concrete import concrete_bool, is_traced
from grng_core.tree import device
from grng_core.triangular import inverse_from_cholesky


class InverseError(ArithmeticError):
    """Newton–Schulz did not converge and the namespace has no linalg to fall back on."""


def default_tol(dtype, xp) -> float:
    """`ns_tol` default: 1e-6 in float64, 1e-4 in float32 (§2.1)."""
    return 1e-6 if dtype == xp.float64 else 1e-4


def eye_like(M, xp):
    return xp.eye(M.shape[-1], dtype=M.dtype, device=device(M))


def frobenius(x, xp):
    return xp.sqrt(xp.sum(x * x))


def has_linalg(xp) -> bool:
    return hasattr(xp, "linalg") and hasattr(xp.linalg, "cholesky")


RESCUE_SHIFTS = (1e-6, 1e-4, 1e-2, 1.0)  # extra damping, relative to tr(M)/d


def cholesky_inverse(M, xp, name="matrix", strict=True, rescue=None):
    """M^{-1} from the Cholesky factor L (M = L L^T): X = L^{-T} L^{-1}.

    When the factorisation fails: non-finite M gives NaN (as jax does), so the optimizer's
    non-finite guard skips the step and leaves the state untouched. A finite M that is not
    numerically positive definite (damping below the dtype's precision): with `rescue` (a
    callable taking the extra damping τ), M + τI is inverted for the first τ of
    `RESCUE_SHIFTS`·tr(M)/d that factorises and `rescue(τ)` reports it, NaN when none does
    (the step is skipped); without it InverseError names the matrix (strict) or NaN.
    Under jit jax returns NaN for both and the step is skipped.
    """
    try:
        L = lapack.cholesky(M, xp)
    except Exception as e:  # numpy LinAlgError, torch _LinAlgError: M not positive definite
        finite = concrete_bool(xp.all(xp.isfinite(M)))
        if finite and rescue is not None:
            return _rescued(M, xp, rescue)
        if strict and finite:
            raise InverseError(
                f"{name} ({M.shape[-1]} x {M.shape[-1]}, {M.dtype}) is not numerically "
                "positive definite (Cholesky failed): raise damping or use state_dtype="
                "'float64'"
            ) from e
        return xp.full_like(M, math.nan)
    return inverse_from_cholesky(L, xp)


def _rescued(M, xp, rescue):
    """(M + τI)⁻¹ for the smallest τ in RESCUE_SHIFTS·tr(M)/d that factorises (host only)."""
    d = M.shape[-1]
    eye = eye_like(M, xp)
    scale = abs(float(xp.sum(xp.abs(M) * eye))) / d or float(xp.finfo(M.dtype).tiny)
    for rel in RESCUE_SHIFTS:
        tau = rel * scale
        try:
            L = xp.linalg.cholesky(M + tau * eye)
        except Exception:  # try the next, larger shift
            continue
        rescue(tau)
        return inverse_from_cholesky(L, xp)
    return xp.full_like(M, math.nan)


def symmetrize(X, xp):
    """(X + Xᵀ)/2: exactly symmetric whatever the BLAS (x + y == y + x in IEEE arithmetic)."""
    return 0.5 * (X + xp.matrix_transpose(X))


def _residual(M, X, eye, xp, d):
    R = eye - M @ X
    return R, frobenius(R, xp) / math.sqrt(d)


def _iterate(M, X, eye, xp, d, tol, max_iter):
    """X ← X(2I − M X) = X + X R until ‖R‖_F/√d ≤ tol or max_iter iterations.

    Eager: a Python loop that stops when converged. Traced (jax.jit): `lax.while_loop`, so a
    converged iteration costs nothing more (no fixed budget); the iterates are the same."""
    if is_traced(M) or is_traced(X):
        from jax import lax  # only reached when jax is tracing this computation

        def cond(carry):
            i, _, R = carry
            return (i < max_iter) & ~(frobenius(R, xp) / math.sqrt(d) <= tol)

        def body(carry):
            i, X, R = carry
            X = X + X @ R
            return i + 1, X, eye - M @ X

        return lax.while_loop(cond, body, (0, X, eye - M @ X))[1]
    for _ in range(max_iter):
        R, r = _residual(M, X, eye, xp, d)
        if concrete_bool(r <= tol):
            break
        X = X + X @ R
    return X


def newton_schulz_inverse(M, xp, *, warm=None, tol, max_iter, fallback=True, name="matrix",
                          rescue=None):
    """(X ≈ M^{-1}, residual ‖I − M X‖_F / √d) for symmetric positive definite M (§2.1).

    warm: a previous inverse; used when ‖I − M warm‖_F < 1 (so the iteration converges),
    else the cold start X₀ = I / ‖M‖_F. fallback: Cholesky where xp has linalg (with
    `rescue`, see `cholesky_inverse`), else raise.
    """
    d = M.shape[-1]
    eye = eye_like(M, xp)
    X = eye / frobenius(M, xp)
    if warm is not None:
        _, r_warm = _residual(M, warm, eye, xp, d)
        X = xp.where(r_warm * math.sqrt(d) < 0.5, warm, X)
    X = _iterate(M, X, eye, xp, d, tol, max_iter)
    X = symmetrize(X, xp)
    _, r = _residual(M, X, eye, xp, d)
    if not fallback:
        return X, r
    failed = ~(r <= tol)  # also true for NaN
    host_failed = concrete_bool(failed)
    if host_failed is False:
        return X, r
    if has_linalg(xp):
        X = xp.where(failed, cholesky_inverse(M, xp, name, rescue=rescue), X)
        return X, r
    if host_failed and concrete_bool(xp.all(xp.isfinite(M))):
        cond = float(frobenius(M, xp) * frobenius(X, xp)) / d
        raise InverseError(
            f"Newton–Schulz inverse of {name} did not converge in {max_iter} iterations "
            f"(residual {float(r):.3g} > ns_tol {tol:g}; condition estimate {cond:.3g}); this "
            "array namespace has no linalg to fall back on: raise damping or ns_max_iter"
        )
    return xp.where(failed, xp.full_like(X, math.nan), X), r


def eigh(M, xp, name="matrix"):
    """(e, Q) with M = Q diag(e) Qᵀ for symmetric M. A non-finite M gives NaN (the guard skips
    the step); a finite M whose decomposition fails raises InverseError naming it."""
    try:
        return lapack.eigh(M, xp)
    except Exception as err:  # LinAlgError on non-finite input (numpy, torch)
        if concrete_bool(xp.all(xp.isfinite(M))):
            raise InverseError(f"{name}: eigendecomposition failed ({err})") from err
        nan = xp.full_like(M, math.nan)
        return nan[0, :], nan


def eigh_inverse(M, xp, shift=0.0, name="matrix", rescue=None):
    """(M + shift·I)⁻¹ = Q diag(1/(e + shift)) Qᵀ from M = Q diag(e) Qᵀ (§2.1, "eigh").

    Failures as for Cholesky: a non-finite M gives NaN (the guard skips the step); a finite
    M whose shifted eigenvalues are not all above d·eps·max|e + shift| gets extra damping with
    `rescue`, else raises InverseError naming the matrix (NaN under jit)."""
    e, Q = eigh(M, xp, name)
    lam = e + shift
    eps = xp.finfo(M.dtype).eps * M.shape[-1]
    ok = xp.min(lam) > eps * xp.max(xp.abs(lam))
    X = symmetrize((Q / lam) @ xp.matrix_transpose(Q), xp)
    if concrete_bool(ok) is False and concrete_bool(xp.all(xp.isfinite(M))):
        if rescue is not None:  # shift the spectrum up as Cholesky's rescue does
            return _rescued(M + shift * eye_like(M, xp), xp, rescue)
        raise InverseError(
            f"{name} ({M.shape[-1]} x {M.shape[-1]}, {M.dtype}) is not numerically positive "
            "definite (smallest eigenvalue below the dtype's resolution): raise damping or use "
            "state_dtype='float64'")
    return xp.where(ok, X, xp.full_like(X, math.nan))


def diagonal_inverse(v, xp, name="diagonal", rescue=None):
    """1/v for a positive diagonal kept as a vector (an embedding's damped A, §2.1). Entries
    not above d·eps·max(v) on the host: with `rescue`, v + τ for the first τ of
    RESCUE_SHIFTS·mean(v) that clears it (reported), else InverseError; NaN under jit."""
    eps = xp.finfo(v.dtype).eps * v.shape[-1]
    ok = xp.min(v) > eps * xp.max(xp.abs(v))
    if concrete_bool(ok) is False and concrete_bool(xp.all(xp.isfinite(v))):
        if rescue is None:
            raise InverseError(f"{name} ({v.shape[-1]} entries, {v.dtype}) is not numerically "
                               "positive: raise damping or use state_dtype='float64'")
        scale = abs(float(xp.mean(v))) or float(xp.finfo(v.dtype).tiny)
        for rel in RESCUE_SHIFTS:
            w = v + rel * scale
            if float(xp.min(w)) > float(eps * xp.max(xp.abs(w))):
                rescue(rel * scale)
                return 1.0 / w
        return xp.full_like(v, math.nan)
    return xp.where(ok, 1.0 / v, xp.full_like(v, math.nan))


def resolve_method(method: str, xp, reused_across_dampings: bool = False) -> str:
    """The inverse method that runs: "auto" is Cholesky (through the backend's triangular
    solve) where the namespace has linalg, else Newton–Schulz; when one decomposition serves
    the different dampings of several steps (§3.2, a per-step damping with inverse_every > 1)
    "auto" is "eigh"; "cholesky" and "eigh" need linalg and fall back to Newton–Schulz
    without it (§2.1)."""
    if not has_linalg(xp):
        return "newton_schulz"
    if method == "auto":
        return "eigh" if reused_across_dampings else "cholesky"
    return method


def spd_inverse(M, xp, *, method, warm=None, tol, max_iter, name="matrix", rescue=None):
    """Inverse of an SPD matrix by `method` ("newton_schulz", "cholesky", "eigh" or "auto");
    exactly symmetric whatever the method. `rescue`: extra damping for a matrix that is not
    numerically positive definite, reported to the callable (`cholesky_inverse`)."""
    method = resolve_method(method, xp)
    if method == "cholesky":
        return cholesky_inverse(M, xp, name, rescue=rescue)
    if method == "eigh":
        return eigh_inverse(M, xp, name=name, rescue=rescue)
    return newton_schulz_inverse(M, xp, warm=warm, tol=tol, max_iter=max_iter, name=name,
                                 rescue=rescue)[0]


def small_spd_inverse(M, xp, *, tol, max_iter, name="batch system", strict=True,
                      rescue=None):
    """Inverse of a small (B × B) SPD system: Cholesky where linalg exists, else Newton–Schulz.
    strict=False: a finite matrix that is not numerically positive definite gives NaN (the
    step is skipped and counted) instead of raising InverseError; `rescue`: extra damping
    instead (`cholesky_inverse`)."""
    if has_linalg(xp):
        return cholesky_inverse(M, xp, name, strict=strict, rescue=rescue)
    return newton_schulz_inverse(M, xp, tol=tol, max_iter=max_iter, name=name)[0]
