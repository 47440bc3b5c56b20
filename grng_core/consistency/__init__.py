"""Cross-backend consistency: the same training run on every installed array library.

    python -m grng_core.consistency                     # float64, 20 steps, tolerance 1e-10
    python -m grng_core.consistency --dtype float32     # tolerance 2e-3 (see FLOAT32_TOL)
    python -m grng_core.consistency --quick             # 6 configurations, 5 steps, small
    python -m grng_core.consistency --backends numpy,torch --steps 50 --tol 1e-12

For every optimizer x structure x estimator (RING has no estimator) the reference MLP
(`grng_core.reference.MLP`, hand-written gradients, per-example gradients, K-FAC statistics and
Hessian-vector products) is trained from the same initial weights on the same minibatches of
sklearn's digits, with the core API directly (`opt.init`, `opt.update(..., curvature=,
inverse=)` with the host's `opt.flags(step)`, `gc.apply_updates`), on NumPy,
array-api-strict, PyTorch (CPU), JAX (jit, x64 enabled) and CuPy (where a GPU exists).

The measure, per backend pair: the largest over steps, over parameter leaves (after every step)
and over the final optimizer state's arrays of ‖a − b‖ / max(‖a‖, ‖b‖) (Frobenius norms; a pair
of zero arrays counts 0). A non-finite value or a failed run counts as infinity.
The command prints one row per configuration and one column per backend pair, and exits with
status 1 when a difference is above the tolerance (ALGORITHMS.md §4: 1e-10 in float64).

float32 tolerance: FLOAT32_TOL = 2e-3. Rounding differs between libraries (BLAS kernels,
reduction order) by about 1e-7 per operation and the differences grow along a run, most through
the finite-difference estimator ((g+ - g)/eps with eps = fd_radius/|g| cancels digits) and the
woodbury B x B solve (condition ~ |J J^T| / (damping B)). Measured on a 2-core x86_64 CPU
(20 steps, default settings): largest 4.1e-4 (reng/woodbury/fin_diff, numpy vs jax), about what
float32 itself costs (the same numpy run in float32 vs float64 differs by 2.3e-4); the runs
with neither finite differences nor a RENG/RING woodbury solve stay below 1e-5. The bound has a
5x margin; float32 checks the float32 code paths (dtypes, no overflow), float64 (1e-10,
measured largest 7e-13) checks the math.
"""

from __future__ import annotations

from grng_core.consistency.backends import ALL_BACKENDS, available_backends, gpu_available
from grng_core.consistency.cases import Config, default_configs, quick_configs
from grng_core.consistency.cli import main
from grng_core.consistency.report import (
    DEFAULT_STEPS,
    FLOAT32_TOL,
    FLOAT64_TOL,
    Report,
    default_tol,
    run,
)
from grng_core.consistency.runs import Problem, compare, make_problem, train

__all__ = [
    "ALL_BACKENDS",
    "DEFAULT_STEPS",
    "FLOAT32_TOL",
    "FLOAT64_TOL",
    "Config",
    "Problem",
    "Report",
    "available_backends",
    "compare",
    "default_configs",
    "default_tol",
    "gpu_available",
    "main",
    "make_problem",
    "quick_configs",
    "run",
    "train",
]
