"""jax.jit(jax.vmap(run)) over 8 seeds, `run` a `lax.scan` of 12 training steps: every
optimizer's default (RING's adaptive damping with the "auto" inverse, R-Kalman's Kronecker
belief with its in-graph predict branches) compiles and runs, and the 8 runs equal separate runs.

Run in a subprocess with a time limit, because this is where XLA:CPU deadlocked: jaxlib's
batched LAPACK kernels (each K-FAC factor's eigh / Cholesky under vmap) split the batch over
the intra-op pool and block a pool thread waiting for it; with as many in flight as the pool
has threads the process sat at 0% CPU for ever (RING's scanned run, every time on 2 cores;
R-Kalman's once on CI). `grng_core.lapack` maps vmapped decompositions one matrix at a time on
the CPU. A run that does not finish prints its Python stack (faulthandler) and fails. The
hidden width (64: a 65 × 65 factor) is large enough for jaxlib to split the batch of 8."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import faulthandler, os, sys
faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)  # a hang prints where it is
import jax, jax.numpy as jnp, numpy as np, optax, grng_jax
name, seeds = sys.argv[1], 8
def init(key):
    k1, k2 = jax.random.split(key)
    return {"l1": grng_jax.init_dense(k1, 16, 64), "l2": grng_jax.init_dense(k2, 64, 4)}
def loss_fn(p, batch):
    h = jnp.tanh(grng_jax.dense(batch[0], p["l1"]["kernel"], p["l1"]["bias"]))
    z = grng_jax.dense(h, p["l2"]["kernel"], p["l2"]["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()
opt = getattr(grng_jax, name)(0.1)
def run(params, xs, ys):
    def body(carry, batch):
        p, st = carry
        grads = jax.grad(loss_fn)(p, batch)
        u, st = opt.update(grads, st, p, loss_fn=loss_fn, batch=batch)
        return (optax.apply_updates(p, u), st), None
    return jax.lax.scan(body, (params, opt.init(params)), (xs, ys))[0]
keys = jax.random.split(jax.random.PRNGKey(0), seeds)
x = jax.random.normal(jax.random.PRNGKey(1), (seeds, 12, 32, 16))
y = jax.random.randint(jax.random.PRNGKey(2), (seeds, 12, 32), 0, 4)
params, state = jax.jit(jax.vmap(run))(jax.vmap(init)(keys), x, y)
one = jax.jit(run)
for s in (0, 5):
    p, _ = one(init(keys[s]), x[s], y[s])
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b[s]), rtol=1e-3, atol=2e-4)
print("ok", int(state.core.skipped.sum()))
'''


def _run(name, limit):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "JAX_ENABLE_X64": "0",
           "PYTHONPATH": os.pathsep.join([os.path.join(root, "adapters"), root,
                                          os.environ.get("PYTHONPATH", "")])}
    try:
        # faulthandler exits the script at `limit`; the outer limit only catches a wedge of it
        return subprocess.run([sys.executable, "-c", SCRIPT, name, str(limit)],
                              capture_output=True, text=True, timeout=limit + 60, env=env)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("name", ["ring", "rkalman"])
def test_jit_vmap_of_a_scanned_run_over_eight_seeds(name):
    out = _run(name, 240)
    assert out is not None and "Timeout (" not in out.stderr, (
        f"jit(vmap(scan)) over 8 seeds of grng_jax.{name} hung (XLA:CPU deadlock); where:\n"
        + ("" if out is None else out.stderr[-3000:]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok 0", out.stdout
