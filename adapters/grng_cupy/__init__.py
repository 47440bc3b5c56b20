"""grng_cupy: RENG, RING and R-Kalman for training stacks that hold CuPy (or NumPy) arrays.

CuPy has no autodiff: the stack computes its own gradients (and, as the optimizer needs them,
per-example gradients or K-FAC layer statistics, a gradient function or a Hessian-vector
product) and the optimizer updates the parameter arrays in place::

    import grng_cupy
    opt = grng_cupy.RING(params, lr=0.1, rho=0.05, damping=1e-3, structure="woodbury")
    for x, y in batches:
        grads, per_example = my_backward(params, x, y)
        opt.step(grads, stats=grng_core.Stats(per_example_grads=per_example))
    opt.save("opt.npz")        # portable: loadable by the torch, jax and numpy stacks too
    opt.load("opt.npz")        # the file's optimizer and hyperparameters must be opt's

The math and the policy live in `grng_core`; this package keeps the host step counter `opt.t`
(it passes the core's `flags(opt.t)` to the update, so statistics are needed only on curvature
steps: `opt.needs_stats()`), checks that every array is on the parameters' device, and writes
θ + u back into the user's arrays. The builders' keywords are the fields of grng_core's config
records (`help(grng_cupy.RING)`), plus `layers` and `fallback` (`grng_core.Optimizer.resolve`).
"""

from grng_cupy._optimizer import RENG, RING, CupyOptimizer, RKalman

__all__ = ["RENG", "RING", "CupyOptimizer", "RKalman"]
