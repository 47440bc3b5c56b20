"""grng_cupy takes an oracle with the passes' K-FAC rows (`Oracle.grad_rows_fn`): R-Kalman's
finite-difference ĝ is then preconditioned in factored form on NumPy arrays (ALGORITHMS.md
§2.1), with the same parameters as the dense run."""

import grng_cupy
import numpy as np
from array_api_compat import array_namespace

import grng_core as gc
from grng_core.reference import MLP
from grng_core.structures import factored, input_gram

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


def _run_convlike(xp, reduced: bool):
    """RING on one shared-weight layer (5 examples × 4 positions, 6 inputs, 3 outputs), its
    rows handed as rows or reduced (`grng_core.InputGram`, a hand-written convolution's)."""
    rng = np.random.default_rng(2)
    W, b = xp.asarray(0.3 * rng.standard_normal((3, 6))), xp.asarray(np.zeros(3))
    opt = grng_cupy.RING([W, b], layers=[gc.LayerSpec(0, 1)], lr=0.1, damping=1e-2,
                         curvature_every=2, inverse_every=2)
    for _ in range(5):
        a, s = rng.standard_normal((20, 6)), rng.standard_normal((20, 3))
        grads = [xp.asarray(s.T @ a / 5), xp.asarray(s.sum(0) / 5)]
        inputs = (input_gram.reduce_rows(xp.asarray(a), True, array_namespace(grads[0]),
                                         grads[0].dtype) if reduced else xp.asarray(a))
        opt.step(grads, stats=gc.Stats(layers=[gc.LayerStats(0, 1, inputs, xp.asarray(s),
                                                             batch_size=5)]))
    return [np.asarray(p.get() if hasattr(p, "get") else p) for p in (W, b)]


def test_reduced_rows_step_as_the_rows(xp):
    """A stack may hand a layer's rows reduced (ALGORITHMS.md §2.1 "Input rows reduced
    early"): the same steps."""
    for r, g in zip(_run_convlike(xp, False), _run_convlike(xp, True)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)
