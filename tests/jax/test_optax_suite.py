"""optax-style suite: every optimizer x structure x GR estimator, jitted, reaches the optimum of a
quadratic (least squares) and of a logistic regression; the state keeps its shapes and dtypes;
the jitted train step compiles once.

The models are tagged dense layers (grng_jax.dense), so "kfac" runs on K-FAC statistics from the
perturbation pass, "woodbury" on vmap per-example gradients, and the GR estimators on jvp-of-grad
Hessian-vector products and re-evaluated gradients. The convergence grid inverts with Cholesky
(it compiles faster; the default Newton–Schulz path is held to the reference in
test_reference_equivalence.py).
"""

from __future__ import annotations

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import cases
from tests.jax import _problems as P

CASES = cases.select(bare=True)  # every row of the table (tests/cases.py)

# (learning_rate, damping) for RENG/RING; (learning_rate, prior_var) for R-Kalman. The empirical
# Fisher of a regression shrinks with the residuals, hence the larger damping on the quadratic.
HP = {
    ("least_squares", "kfac"): (0.2, 0.1), ("least_squares", "diagonal"): (0.3, 0.3),
    ("least_squares", "woodbury"): (0.1, 0.1),
    ("logistic", "kfac"): (1.0, 1e-2), ("logistic", "diagonal"): (1.0, 0.3),
    ("logistic", "woodbury"): (0.5, 1e-2),
}
HP_KALMAN = {
    ("least_squares", "kfac"): (1.0, 1.0), ("least_squares", "diagonal"): (1.0, 1.0),
    ("least_squares", "woodbury"): (1.0, 1.0),
    ("logistic", "kfac"): (1.0, 10.0), ("logistic", "diagonal"): (3.0, 1.0),
    ("logistic", "woodbury"): (1.0, 10.0),
}
STEPS = 200
TOL = 1e-6


def make(case, problem, **extra):
    kw = dict(rho=0.05, inverse_method="cholesky", **extra)
    if case.optimizer == "rkalman":
        lr, prior = HP_KALMAN[(problem, case.structure)]
        if case.structure == "kfac":
            # the empirical Fisher of the regression vanishes at the optimum: at lr = 1 a
            # small damping makes the steps there unstable (with exact inverses too: the run
            # leaves the optimum periodically), so the kfac belief gets λ = 1 on it
            kw["damping"] = 1.0 if problem == "least_squares" else HP[(problem, "kfac")][1]
        return case.jax(lr, prior_var=prior, **kw)
    lr, damping = HP[(problem, case.structure)]
    return case.jax(lr, damping=damping, **kw)


@pytest.mark.parametrize("problem", ["least_squares", "logistic"])
@pytest.mark.parametrize("case", CASES, ids=cases.ids(CASES))
def test_reaches_the_optimum(case, problem):
    params, batch, loss_fn, loss_opt = getattr(P, problem)()
    opt = make(case, problem)
    final, state = P.run_steps(opt, loss_fn, params, batch, STEPS)
    # fori_loop already requires a carry of fixed shapes and dtypes; checked here explicitly
    assert _avals(state) == _avals(opt.init(params))
    gap = float(loss_fn(final, batch)) - loss_opt
    assert -1e-12 <= gap <= TOL * max(1.0, abs(loss_opt)), f"loss gap {gap:.3e}"
    assert int(state.core.step) == STEPS
    assert int(state.core.skipped) == 0


def _avals(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), jax.typeof(x).weak_type), tree)


# one compile each: every optimizer and structure, refresh periods, momentum, "mc", both dtypes
COMPILE_CASES = [(cases.get(label, bare=True), extra, dtype) for label, extra, dtype in (
    ("ring/kfac/-", dict(curvature_every=2, inverse_every=3), jnp.float32),
    ("reng/woodbury/fin_diff", {}, jnp.float64),
    ("rkalman/kfac/double_bp", {}, jnp.float64),  # inverse_every=10 default
    ("rkalman/diagonal/fin_diff", dict(momentum=0.9), jnp.float32),
    ("reng/kfac/double_bp+mc", dict(inverse_every=2), jnp.float64),
)]


@pytest.mark.parametrize("case,extra,dtype", COMPILE_CASES,
                         ids=[f"{c.id}-{jnp.dtype(d).name}" for c, _, d in COMPILE_CASES])
def test_state_is_fixed_and_the_step_compiles_once(case, extra, dtype):
    params = P.mlp_params((5, 6, 3), dtype=dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 5), dtype)
    batch = (x, jnp.arange(12) % 3)
    opt = case.jax(0.05, inverse_method="cholesky", **extra)
    mc = {"mc_loss_fn": grng_jax.mc_softmax_cross_entropy(
        lambda p, b: P.mlp_logits(p, b[0]))} if case.fisher == "mc" else {}
    state = opt.init(params)
    first = _avals(state)
    step = jax.jit(P.make_step(opt, P.softmax_ce, **mc))
    p = params
    for _ in range(7):  # crosses the refresh periods (2, 3) and their lcm 6
        p, state, loss = step(p, state, batch)
        assert _avals(state) == first
        assert _avals(p) == _avals(params)
    assert step._cache_size() == 1
    assert np.isfinite(float(loss))
    assert int(state.core.step) == 7
    # the state's float arrays are in the params' dtype (float32 by default, float64 with x64)
    floats = {str(x.dtype) for x in jax.tree.leaves(state.core)
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats <= {str(jnp.dtype(dtype))}
    assert state.key.dtype == jnp.uint32


DEFAULT_DTYPE_SCRIPT = r'''
import jax, jax.numpy as jnp, optax
assert not jax.config.jax_enable_x64
import grng_jax
from tests.jax import _problems as P
params = P.mlp_params((5, 6, 3), dtype=jnp.float32)
batch = (jnp.ones((8, 5)), jnp.arange(8) % 3)
for opt in (grng_jax.ring(0.1, inverse_method="cholesky"), grng_jax.rkalman(0.5)):
    step = jax.jit(P.make_step(opt, P.softmax_ce))
    p, s = params, opt.init(params)
    for _ in range(3):
        p, s, loss = step(p, s, batch)
    assert step._cache_size() == 1
    assert {x.dtype for x in jax.tree.leaves(s.core)} <= {jnp.dtype("float32"), jnp.dtype("int32")}
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype("float32")}
print("OK")
'''


def test_float32_by_default_without_x64():
    """Without JAX_ENABLE_X64 (JAX's default) everything is float32 (a fresh process: the test
    session has x64 on)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.path.join(root, "adapters"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", DEFAULT_DTYPE_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
