"""Small helpers shared by the core tests: one optimizer step, relative errors."""

from __future__ import annotations

import numpy as np

import grng_core as gc


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def tree_rel_err(a, b) -> float:
    return max(rel_err(x, y) for x, y in zip(a, b))


def mlp_layers(mlp):
    return [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]


def train(backend, mlp, opt, x_np, y_np, steps, *, dtype="float64", flags=True, seed=0,
          kind="both"):
    """`steps` core steps on the reference MLP; returns (params as numpy, state, losses)."""
    params = backend.tree(mlp.init(seed=seed), dtype)
    x, y = backend.asarray(x_np, dtype), backend.asarray(y_np, dtype)
    state = opt.init(params, layers=mlp_layers(mlp))
    losses = []
    for t in range(1, steps + 1):
        stats = mlp.stats(params, x, y, kind=kind)
        grads = mlp.grad(params, x, y)
        cur, inv = opt.flags(t - 1) if flags else (None, None)
        upd, state = opt.update(grads, state, params, stats=stats, oracle=mlp.oracle(x, y),
                                curvature=cur, inverse=inv)
        params = gc.apply_updates(params, upd)
        losses.append(float(backend.to_numpy(mlp.loss(params, x, y))))
    return backend.tree_numpy(params), state, losses
