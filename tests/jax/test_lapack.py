"""grng_core.lapack under jax.vmap: each decomposition equals NumPy's per matrix (float64), and
on the CPU the vmapped program holds no batched LAPACK kernel (the one that deadlocked XLA:CPU,
tests/jax/test_vmap_seeds.py), at any vmap depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grng_core import lapack


def _spd(rng, batch, d):
    a = rng.standard_normal((*batch, d, 3 * d))
    return a @ np.swapaxes(a, -1, -2) / (3 * d) + np.eye(d)


def _decompositions():
    return {
        "eigh": lambda M: lapack.eigh(M, jnp),
        "cholesky": lambda M: lapack.cholesky(M, jnp),
        "solve_lower": lambda M: lapack.jax_solve_lower(lapack.cholesky(M, jnp), jnp.eye(
            M.shape[-1], dtype=M.dtype)),
        "qr_r": lambda M: lapack.qr_r(M, jnp),
    }


def _numpy(name, M):
    if name == "eigh":
        return np.linalg.eigh(M)
    if name == "cholesky":
        return np.linalg.cholesky(M)
    if name == "solve_lower":
        return np.linalg.inv(np.linalg.cholesky(M))
    return np.linalg.qr(M, mode="r")


def _batched_eigen_operands(fn, *args) -> list[tuple[str, tuple]]:
    """(primitive, operand shape) of every LAPACK-kind primitive in fn's jaxpr, nested ones too."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in {"eigh", "cholesky", "triangular_solve", "householder_product",
                                      "geqrf", "qr"}:
                found.append((eqn.primitive.name, tuple(eqn.invars[0].aval.shape)))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("name", ["eigh", "cholesky", "solve_lower", "qr_r"])
def test_vmapped_decompositions_equal_numpy_per_matrix(name):
    rng = np.random.default_rng(0)
    Ms = _spd(rng, (2, 3), 9)
    fn = jax.jit(jax.vmap(jax.vmap(_decompositions()[name])))
    got = fn(jnp.asarray(Ms))
    for i in np.ndindex(2, 3):
        want = _numpy(name, Ms[i])
        if name == "eigh":
            e, Q = (np.asarray(g[i]) for g in got)
            np.testing.assert_allclose(e, want[0], rtol=1e-12)
            np.testing.assert_allclose(Q @ np.diag(e) @ Q.T, Ms[i], rtol=1e-12, atol=1e-12)
        elif name == "qr_r":  # R is unique up to the signs of its rows
            R = np.asarray(got[i])
            np.testing.assert_allclose(np.abs(R), np.abs(want), rtol=1e-10, atol=1e-12)
        else:
            np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the sequential map is CPU-only")
@pytest.mark.parametrize("name", ["eigh", "cholesky", "solve_lower", "qr_r"])
def test_no_batched_lapack_kernel_under_vmap_on_cpu(name):
    Ms = jnp.asarray(_spd(np.random.default_rng(1), (4, 2), 5))
    found = _batched_eigen_operands(jax.vmap(jax.vmap(_decompositions()[name])), Ms)
    assert found, "the decomposition should appear in the program"
    assert all(len(shape) == 2 for _, shape in found), found


def test_other_namespaces_pass_through():
    M = _spd(np.random.default_rng(2), (), 6)
    e, Q = lapack.eigh(M, np)
    np.testing.assert_allclose(Q @ np.diag(e) @ Q.T, M, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(lapack.cholesky(M, np), np.linalg.cholesky(M))
    np.testing.assert_array_equal(lapack.qr_r(M, np), np.linalg.qr(M)[1])


def test_differentiable_as_the_original():
    """The wrapper keeps JAX's derivatives (custom_vmap alone has no reverse mode): gradients
    through each decomposition equal those through jax.numpy's own, also under vmap."""
    M = jnp.asarray(_spd(np.random.default_rng(3), (), 5))
    raw = {"eigh": lambda A: jnp.linalg.eigh(A)[0] @ jnp.arange(5.0),
           "cholesky": lambda A: jnp.sum(jnp.linalg.cholesky(A) ** 2 * jnp.arange(5.0)),
           "qr_r": lambda A: jnp.sum(jnp.abs(jnp.linalg.qr(A, mode="r")))}
    ours = {"eigh": lambda A: lapack.eigh(A, jnp)[0] @ jnp.arange(5.0),
            "cholesky": lambda A: jnp.sum(lapack.cholesky(A, jnp) ** 2 * jnp.arange(5.0)),
            "qr_r": lambda A: jnp.sum(jnp.abs(lapack.qr_r(A, jnp)))}
    for name in raw:
        want = jax.grad(raw[name])(M)
        np.testing.assert_allclose(jax.grad(ours[name])(M), want, rtol=1e-10, atol=1e-12)
        both = jnp.stack([M, 2 * M])
        np.testing.assert_allclose(jax.vmap(jax.grad(ours[name]))(both),
                                   jax.vmap(jax.grad(raw[name]))(both), rtol=1e-10, atol=1e-12)
