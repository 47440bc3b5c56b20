"""The LAPACK-backed decompositions the core calls (eigh, Cholesky, a lower triangular solve,
QR's R), one matrix at a time under `jax.vmap` on JAX's CPU backend (ALGORITHMS.md §2.1).

Why: jaxlib's CPU kernels for a batch of matrices (``ParallelBatchMap`` in its LAPACK FFI,
jaxlib 0.10) split the batch over XLA's intra-op thread pool and block the pool thread that
runs them until the pieces are done. With as many such kernels in flight as the pool has
threads, every thread waits on work queued behind it and the program deadlocks at 0% CPU.
`jax.jit(jax.vmap(run))` over seeds, with `run` a `lax.scan` of RING's steps, hung so every
time on 2 cores (each K-FAC factor's decomposition becomes a batched kernel, and XLA runs
independent ones at once). Here a vmapped call maps the matrices one by one (`lax.map`:
each kernel then runs inline); on GPU backends the batched kernel is kept. Other namespaces
call their own ``linalg`` directly. Differentiating through them works as through JAX's own
(their JVP is the original function's; under vmap the tangents take the batched kernel).
On the CPU the first use also sets the BLAS under those kernels to one thread
(`grng_core.blas_threads`).
"""

from __future__ import annotations

import functools

import array_api_compat

from grng_core import blas_threads


@functools.cache
def _jax_ops() -> dict:
    """JAX's decompositions wrapped so that a vmapped call on the CPU maps one matrix at a
    time (built once, on first use: no JAX import at module level)."""
    import jax
    import jax.numpy as jnp
    from jax.custom_batching import custom_vmap
    from jax.scipy.linalg import solve_triangular

    if jax.default_backend() == "cpu":
        blas_threads.limit_for_jax()

    def one_at_a_time(fn):
        wrapped = custom_vmap(fn)

        @wrapped.def_vmap
        def rule(axis_size, in_batched, *args):
            if jax.default_backend() != "cpu":  # the batched kernel is safe and fast there
                out = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(*args)
            else:
                args = tuple(a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                             for a, b in zip(args, in_batched, strict=True))
                out = jax.lax.map(lambda a: wrapped(*a), args)
            return out, jax.tree_util.tree_map(lambda _: True, out)

        # differentiable as `fn` is (custom_vmap alone has no reverse mode): the tangents go
        # through fn's own JVP rule (batched as fn's under vmap)
        differentiable = jax.custom_jvp(wrapped)
        differentiable.defjvp(lambda primals, tangents: jax.jvp(fn, primals, tangents))
        return differentiable

    return {
        "eigh": one_at_a_time(lambda M: tuple(jnp.linalg.eigh(M))),
        "cholesky": one_at_a_time(jnp.linalg.cholesky),
        "solve_lower": one_at_a_time(lambda L, B: solve_triangular(L, B, lower=True)),
        "qr_r": one_at_a_time(lambda M: jnp.linalg.qr(M, mode="r")),
    }


def eigh(M, xp):
    """(e, Q) with M = Q diag(e) Qᵀ."""
    if array_api_compat.is_jax_namespace(xp):
        return _jax_ops()["eigh"](M)
    return tuple(xp.linalg.eigh(M))


def cholesky(M, xp):
    """The lower Cholesky factor L, M = L Lᵀ."""
    if array_api_compat.is_jax_namespace(xp):
        return _jax_ops()["cholesky"](M)
    return xp.linalg.cholesky(M)


def jax_solve_lower(L, B):
    """L⁻¹ B for lower triangular L (JAX arrays)."""
    return _jax_ops()["solve_lower"](L, B)


def qr_r(M, xp):
    """R of M's reduced QR factorisation (M = Q R)."""
    if array_api_compat.is_jax_namespace(xp):
        return _jax_ops()["qr_r"](M)
    return xp.linalg.qr(M)[1]
