"""grng_cupy takes an oracle with the passes' K-FAC rows (`Oracle.grad_rows_fn`): R-Kalman's
finite-difference ĝ is then preconditioned in factored form on NumPy arrays (ALGORITHMS.md
§2.1), with the same parameters as the dense run."""

import grng_cupy
import numpy as np

import grng_core as gc
from grng_core.reference import MLP
from grng_core.structures import factored

SIZES, B = (30, 24, 3), 4  # the first layer (24 × 31) pays in factored form with 2·4 rows
MLP_ = MLP(SIZES)
LAYERS = [gc.LayerSpec(*MLP_.layer_keys(k)) for k in range(MLP_.n_layers)]


def _run(xp, rows: bool):
    rng = np.random.default_rng(0)
    params = [xp.asarray(p) for p in MLP_.init(seed=1)]
    opt = grng_cupy.RKalman(params, layers=LAYERS, lr=0.2, rho=0.05, damping=0.1,
                            fd_radius=1e-2, kl_clip=None, curvature_every=3, inverse_every=3)
    for _ in range(5):
        x = xp.asarray(rng.standard_normal((B, SIZES[0])))
        y = xp.asarray(np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)])
        b = MLP_.batch(params, x, y, layer_stats=True)
        oracle = MLP_.oracle(x, y, rows=rows)
        if rows:  # the rows oracle alone (no grad_fn) must serve
            oracle = gc.Oracle(grad_rows_fn=oracle.grad_rows_fn)
        opt.step(b.grads, stats=gc.Stats(layers=b.layers), oracle=oracle)
    return [np.asarray(p.get() if hasattr(p, "get") else p) for p in params]


def test_rows_oracle_equals_dense(xp, monkeypatch):
    count = [0]
    real = factored.apply
    monkeypatch.setattr(factored, "apply",
                        lambda *a, **k: count.__setitem__(0, count[0] + 1) or real(*a, **k))
    dense = _run(xp, False)
    assert count[0] == 0
    got = _run(xp, True)
    if xp.__name__ == "numpy":
        assert count[0] == 5  # the first layer on every step
    for g, d in zip(got, dense):
        np.testing.assert_allclose(g, d, rtol=1e-11, atol=1e-13)
