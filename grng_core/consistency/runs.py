"""One training run of the reference MLP on one backend, and the distance between two runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from grng_core.consistency.backends import backend as _backend
from grng_core.consistency.cases import Config


@dataclass(frozen=True)
class Problem:
    """The model and the minibatches (NumPy, in the run's dtype) every backend trains on."""

    sizes: tuple
    batches: tuple  # ((x, y), ...) one per step
    params0: tuple


def make_problem(steps: int, dtype: str = "float64", hidden: int = 16, batch_size: int = 32,
                 seed: int = 0) -> Problem:
    """Digits (sklearn) minibatches, or Gaussian blobs where sklearn is missing."""
    from grng_core.reference import MLP

    try:
        from grng_core.reference import load_digits_split

        d = load_digits_split(seed=seed)
        x_all, y_all = d.x_train, d.y_train
    except ImportError:
        rng0 = np.random.default_rng(seed + 1)
        labels = rng0.integers(0, 10, 1000)
        centers = rng0.standard_normal((10, 64))
        x_all = centers[labels] + 0.5 * rng0.standard_normal((1000, 64))
        y_all = np.eye(10)[labels]
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        idx = rng.choice(x_all.shape[0], size=batch_size, replace=False)
        batches.append((x_all[idx].astype(dtype), y_all[idx].astype(dtype)))
    sizes = (x_all.shape[1], hidden, y_all.shape[1])
    params0 = tuple(p.astype(dtype) for p in MLP(sizes).init(seed=seed))
    return Problem(sizes, tuple(batches), params0)


def train(backend: str, config: Config, problem: Problem) -> tuple[list, dict]:
    """The parameter trajectory (NumPy, after each step) and the final state's arrays."""
    import grng_core as gc
    from grng_core.checkpoint import META_KEY, state_to_numpy
    from grng_core.reference import MLP

    be = _backend(backend)
    mlp = MLP(problem.sizes, activation="tanh", loss="softmax_ce")
    opt = config.build()
    req = opt.requirements
    layers = [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]
    params = [be.from_numpy(p) for p in problem.params0]
    state = opt.init(params, layers=layers if config.structure == "kfac" else None)

    def step(params, state, x, y, curvature, inverse):
        b = mlp.batch(params, x, y, per_example=req.per_example_grads and curvature,
                      layer_stats=req.layer_stats and curvature)
        stats = gc.Stats(per_example_grads=b.per_example_grads, layers=b.layers)
        updates, state = opt.update(b.grads, state, params, stats, mlp.oracle(x, y),
                                    curvature=curvature, inverse=inverse)
        return gc.apply_updates(params, updates), state

    if be.jit is not None:
        step = be.jit(step)
    trajectory = []
    for t, (x, y) in enumerate(problem.batches):
        curvature, inverse = opt.flags(t)
        params, state = step(params, state, be.from_numpy(x), be.from_numpy(y),
                             curvature=curvature, inverse=inverse)
        trajectory.append([np.asarray(be.to_numpy(p), dtype=np.float64) for p in params])
    final = {k: np.asarray(v, dtype=np.float64) for k, v in state_to_numpy(state).items()
             if k != META_KEY}
    return trajectory, final


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    if scale == 0.0:
        return 0.0
    return float(np.linalg.norm(a - b)) / scale


def compare(run_a, run_b) -> float:
    """The largest relative difference between two runs (trajectory and final state)."""
    (traj_a, fin_a), (traj_b, fin_b) = run_a, run_b
    worst = 0.0
    for pa, pb in zip(traj_a, traj_b, strict=True):
        for a, b in zip(pa, pb, strict=True):
            worst = max(worst, _rel(a, b))
    if set(fin_a) != set(fin_b):
        return math.inf
    for k in fin_a:
        if k.endswith("_vecs"):
            # eigenvectors are not unique (signs, bases of repeated eigenvalues): the factors
            # they decompose (A, S) and the eigenvalues are compared instead
            continue
        worst = max(worst, _rel(fin_a[k], fin_b[k]))
    return worst
