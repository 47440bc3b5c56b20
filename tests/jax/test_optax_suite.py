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

from tests.jax import _problems as P

CASES = []
for _s in ("kfac", "diagonal", "woodbury"):
    CASES += [("reng", _s, "double_backprop"), ("reng", _s, "finite_difference"),
              ("ring", _s, None),
              ("rkalman", _s, "double_backprop"), ("rkalman", _s, "finite_difference")]

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


def make(algo, structure, gr, problem, **extra):
    kw = dict(structure=structure, rho=0.05, inverse_method="cholesky", **extra)
    if gr is not None:
        kw["gr"] = gr
    if algo == "rkalman":
        lr, prior = HP_KALMAN[(problem, structure)]
        return grng_jax.rkalman(lr, prior_var=prior, **kw)
    lr, damping = HP[(problem, structure)]
    return getattr(grng_jax, algo)(lr, damping=damping, **kw)


def _id(case):
    return "-".join(c for c in case if c)


@pytest.mark.parametrize("problem", ["least_squares", "logistic"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_reaches_the_optimum(case, problem):
    algo, structure, gr = case
    params, batch, loss_fn, loss_opt = getattr(P, problem)()
    opt = make(algo, structure, gr, problem)
    final, state = P.run_steps(opt, loss_fn, params, batch, STEPS)
    # fori_loop already requires a carry of fixed shapes and dtypes; checked here explicitly
    assert _avals(state) == _avals(opt.init(params))
    gap = float(loss_fn(final, batch)) - loss_opt
    assert -1e-12 <= gap <= TOL * max(1.0, abs(loss_opt)), f"loss gap {gap:.3e}"
    assert int(state.core.step) == STEPS
    assert int(state.core.skipped) == 0


def _avals(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), jax.typeof(x).weak_type), tree)


@pytest.mark.parametrize("algo,structure,extra,dtype", [
    ("ring", "kfac", dict(curvature_every=2, inverse_every=3), jnp.float32),
    ("reng", "woodbury", dict(gr="finite_difference"), jnp.float64),
    ("rkalman", "kfac", dict(gr="double_backprop"), jnp.float64),  # inverse_every=10 default
    ("rkalman", "diagonal", dict(momentum=0.9), jnp.float32),
    ("reng", "kfac", dict(inverse_every=2, fisher="mc"), jnp.float64),
])
def test_state_is_fixed_and_the_step_compiles_once(algo, structure, extra, dtype):
    params = P.mlp_params((5, 6, 3), dtype=dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 5), dtype)
    batch = (x, jnp.arange(12) % 3)
    kw = dict(structure=structure, inverse_method="cholesky", **extra)
    opt = getattr(grng_jax, algo)(0.05, **kw)
    mc = {"mc_loss_fn": grng_jax.mc_softmax_cross_entropy(
        lambda p, b: P.mlp_logits(p, b[0]))} if extra.get("fisher") == "mc" else {}
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
