"""One thread for the BLAS under JAX's CPU LAPACK kernels (a runtime setting, no math).

jaxlib's CPU kernels for Cholesky, eigh, triangular solves and QR call LAPACK through
``scipy.linalg.cython_lapack``: on a pip install that is SciPy's own OpenBLAS
(``scipy.libs/libscipy_openblas*``), which starts one thread per core. Its threads then compete
with XLA's intra-op pool, which runs the rest of the step at the same time: on a 2-core CPU a
jitted RING step of a small CNN refreshing its K-FAC statistics and inverses took 90–92 ms
with SciPy's default threads and 59–66 ms with one (`python -m benchmarks.jax_cnn_step`; README
"JAX (optax)"; on a 784-1024-256-10 MLP 38.8 against 46.0 ms a step for the Cholesky form,
57.8 against 66.7 ms for the eigh form, though a lone eigh of 1025 is slower on one thread).

So the first JAX decomposition traced for the CPU (`grng_core.lapack`) sets SciPy's own BLAS
to `GRNG_JAX_LAPACK_THREADS` threads (default 1; "0" or "off" leaves it alone) through
threadpoolctl, and logs it (logger "grng"). Only a BLAS that SciPy ships in its own folder is
touched: NumPy's BLAS, torch's, and a BLAS SciPy shares with them (a conda install) are not.
Without threadpoolctl nothing happens.
"""

from __future__ import annotations

import functools
import logging
import os

ENV = "GRNG_JAX_LAPACK_THREADS"


def requested() -> int | None:
    """The thread count `GRNG_JAX_LAPACK_THREADS` asks for; None: leave the BLAS alone."""
    raw = os.environ.get(ENV, "1").strip().lower()
    if raw in ("", "0", "off", "none"):
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: give a thread count (e.g. 1), or 0 / off to leave "
                         "SciPy's BLAS threads as they are") from None
    if n < 0:
        raise ValueError(f"{ENV}={raw!r}: give a thread count >= 1, or 0 / off")
    return n


def scipy_blas_controllers() -> list:
    """threadpoolctl's controllers of the BLAS libraries shipped inside SciPy's install."""
    try:
        import scipy
        import scipy.linalg.cython_lapack  # loads the library jaxlib calls
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    pkg = os.path.dirname(os.path.realpath(scipy.__file__))
    roots = (pkg + os.sep, os.path.join(os.path.dirname(pkg), "scipy.libs") + os.sep)
    return [c for c in ThreadpoolController().lib_controllers
            if c.user_api == "blas" and os.path.realpath(c.filepath).startswith(roots)]


@functools.cache
def limit_for_jax() -> tuple[str, ...]:
    """Set SciPy's own BLAS to the requested thread count, once per process; the file paths
    of the libraries set (empty where nothing was)."""
    n = requested()
    if n is None:
        return ()
    done = []
    for c in scipy_blas_controllers():
        if c.num_threads != n:
            c.set_num_threads(n)
            done.append(c.filepath)
    if done:
        logging.getLogger("grng").info(
            "grng: SciPy's BLAS (%s), which JAX's CPU LAPACK kernels call, set to %d thread(s) "
            "(its threads competed with XLA's); %s=0 leaves it alone", ", ".join(done), n, ENV)
    return tuple(done)
