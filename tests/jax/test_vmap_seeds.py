"""jax.jit(jax.vmap(train_step)) over 8 seeds: every optimizer's default (RING's adaptive
damping with the "auto" inverse, R-Kalman's Kronecker belief with its in-graph predict
branches) compiles and runs, and the 8 runs equal 8 separate runs.

Run in a subprocess with a time limit. XLA:CPU's runtime can wedge (0% CPU, for ever) on a
vmapped program with loops and callbacks: an earlier in-graph refresh branch of R-Kalman did here
(commit e3cba1e), and the R-Kalman case of this test hung once on CI's machine (at 513b56f; it
never did in 12 runs here, 4 at a time included). Upstream reports: jax-ml/jax#25861 (async dispatch
with a callback in a while loop), openxla/xla#33048 (a while loop blocking in async mode),
PyAutoLabs/PyAutoFit#1528 (the Eigen pool, cured by --xla_cpu_multi_thread_eigen=false). So a
run that does not finish in time prints its Python stack (faulthandler) and is run again with
the README's workaround (single-threaded Eigen, no CPU async dispatch); the test then passes with
a warning that names the hang, and fails only if that run fails too (a wrong result fails at
once, whichever run it is)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

SCRIPT = r'''
import faulthandler, os, sys
faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)  # a hang prints where it is
import jax, jax.numpy as jnp, numpy as np, optax, grng_jax
if os.environ.get("GRNG_TEST_SYNC_CPU"):  # the workaround's second half (no env var in jax)
    jax.config.update("jax_cpu_enable_async_dispatch", False)
name, seeds = sys.argv[1], 8
def init(key):
    k1, k2 = jax.random.split(key)
    return {"l1": grng_jax.init_dense(k1, 16, 32), "l2": grng_jax.init_dense(k2, 32, 4)}
def loss_fn(p, batch):
    h = jnp.tanh(grng_jax.dense(batch[0], p["l1"]["kernel"], p["l1"]["bias"]))
    z = grng_jax.dense(h, p["l2"]["kernel"], p["l2"]["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()
opt = getattr(grng_jax, name)(0.1)
def train_step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    u, state = opt.update(grads, state, params, loss_fn=loss_fn, batch=batch)
    return optax.apply_updates(params, u), state
keys = jax.random.split(jax.random.PRNGKey(0), seeds)
x = jax.random.normal(jax.random.PRNGKey(1), (seeds, 32, 16))
y = jax.random.randint(jax.random.PRNGKey(2), (seeds, 32), 0, 4)
params = jax.vmap(init)(keys)
state = jax.vmap(opt.init)(params)
step = jax.jit(jax.vmap(train_step))
for _ in range(4):
    params, state = step(params, state, (x, y))
one = jax.jit(train_step)
for s in (0, 5):
    p = init(keys[s]); st = opt.init(p)
    for _ in range(4):
        p, st = one(p, st, (x[s], y[s]))
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b[s]), rtol=1e-3, atol=2e-4)
print("ok", int(state.core.skipped.sum()))
'''


WORKAROUND = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "GRNG_TEST_SYNC_CPU": "1"}


def _run(name, limit, extra):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "JAX_ENABLE_X64": "0", **extra,
           "PYTHONPATH": os.pathsep.join([os.path.join(root, "adapters"), root,
                                          os.environ.get("PYTHONPATH", "")])}
    try:
        # faulthandler exits the script at `limit`; the outer limit only catches a wedge of it
        return subprocess.run([sys.executable, "-c", SCRIPT, name, str(limit)],
                              capture_output=True, text=True, timeout=limit + 60, env=env)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("name", ["ring", "rkalman"])
def test_jit_vmap_over_eight_seeds(name):
    out = _run(name, 200, {})
    if out is None or "Timeout (" in out.stderr:
        stack = "" if out is None else out.stderr[-3000:]
        out = _run(name, 300, WORKAROUND)
        assert out is not None and "Timeout (" not in out.stderr, (
            f"jit(vmap) over 8 seeds of grng_jax.{name} hung, also with {WORKAROUND}")
        warnings.warn(f"jit(vmap) over 8 seeds of grng_jax.{name} did not finish in 200 s "
                      f"(XLA:CPU runtime wedged); it passed with {WORKAROUND}. Where it "
                      f"hung:\n{stack}", RuntimeWarning, stacklevel=2)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok 0", out.stdout
