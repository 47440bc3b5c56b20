"""The per-layer refresh warm-up (ALGORITHMS.md §2.1): a K-FAC layer given at least
`warmup_rows`·max(d_A, d_S) rows per step skips the warm-up's extra refreshes.

The factors are checked against EMAs formed by hand in float64 from the same steps' rows,
each layer on its own refresh steps."""

import numpy as np
import pytest

import grng_core as gc
from grng_core import schedule
from grng_core.reference import MLP
from tests.helpers import mlp_layers, rel_err

SHAPE = (4, 5, 3)  # layer 0: d_A = 5, d_S = 5; layer 1: d_A = 6, d_S = 3
B = 6  # rows per step: 6 >= 1.1 * 5 (layer 0 skips the warm-up), 6 < 1.1 * 6 (layer 1 not)
KW = dict(lr=0.05, damping=1e-2, curvature_every=3, inverse_every=3, refresh_warmup=4,
          form="gauss_newton", inverse_method="cholesky", kl_clip=None)


def test_layer_warms_formula():
    cfg = gc.ring(warmup_rows=10).config
    assert schedule.layer_warms(cfg, 99, 10, 3) and not schedule.layer_warms(cfg, 100, 10, 3)
    assert schedule.layer_warms(cfg, 4095, 3, 410) and not schedule.layer_warms(cfg, 4100, 3, 410)
    assert schedule.layer_warms(gc.ring(warmup_rows=None).config, 10**9, 2, 2)
    with pytest.raises(ValueError, match="warmup_rows"):
        gc.ring(warmup_rows=0)


def test_steady_flags_are_the_schedule_without_the_warm_up():
    opt = gc.ring(curvature_every=3, inverse_every=3, refresh_warmup=4)
    assert [opt.flags(t)[0] for t in range(7)] == [True] * 4 + [False, False, True]
    assert [opt.steady_flags(t) for t in range(5)] == [
        (True, True), (False, False), (False, False), (True, True), None]
    assert gc.ring(refresh_warmup=0).steady_flags(1) is None
    assert gc.ring(warmup_rows=None).steady_flags(1) is None
    assert gc.ring(structure="diagonal").steady_flags(1) is None


def _hand_factors(stats_per_step, refresh_steps, beta):
    """EMA of Â = aᵀa/n (ones column) and Ŝ = sᵀs/B over `refresh_steps`, first taken whole."""
    A = S = None
    for t in refresh_steps:
        ls = stats_per_step[t]
        a = np.concatenate([ls.inputs, np.ones((ls.inputs.shape[0], 1))], axis=1)
        A_hat, S_hat = a.T @ a / a.shape[0], ls.output_grads.T @ ls.output_grads / B
        A = A_hat if A is None else beta * A + (1 - beta) * A_hat
        S = S_hat if S is None else beta * S + (1 - beta) * S_hat
    return A, S


@pytest.mark.parametrize("rows,refreshes", [
    (1.1, ([0, 3], [0, 1, 2, 3])),  # layer 0 skips the warm-up, layer 1 takes it
    (None, ([0, 1, 2, 3], [0, 1, 2, 3]))])  # every layer takes it
@pytest.mark.parametrize("flags", ["schedule", "explicit"])
def test_each_layer_refreshes_on_its_own_steps(backend, rows, refreshes, flags):
    rs = np.random.default_rng(0)
    mlp = MLP(SHAPE, activation="tanh", loss="softmax_ce")
    opt = gc.ring(**KW, warmup_rows=rows)
    params = backend.tree(mlp.init(seed=1))
    state = opt.init(params, layers=mlp_layers(mlp))
    seen = []  # each step's layer statistics, as numpy
    for t in range(6):
        x = backend.asarray(rs.normal(size=(B, SHAPE[0])))
        y = backend.asarray(np.eye(SHAPE[-1])[rs.integers(0, SHAPE[-1], B)])
        stats = mlp.stats(params, x, y)
        seen.append([gc.LayerStats(ls.weight, ls.bias, backend.to_numpy(ls.inputs),
                                   backend.to_numpy(ls.output_grads)) for ls in stats.layers])
        kw = {}
        if flags == "explicit":  # as the eager adapters call it
            cur, inv = opt.flags(t)
            kw = dict(curvature=cur, inverse=inv, steady=opt.steady_flags(t))
        upd, state = opt.update(mlp.grad(params, x, y), state, params, stats=stats, **kw)
        params = gc.apply_updates(params, upd)
    assert int(backend.to_numpy(state.curvature_count)) == 4  # steps 0-3 refresh some layer
    for i, steps in enumerate(refreshes):
        A, S = _hand_factors([s[i] for s in seen], steps, 0.95)
        layer = state.curvature.kfac[i]
        assert rel_err(backend.to_numpy(layer.A), A) < 1e-12
        assert rel_err(backend.to_numpy(layer.S), S) < 1e-12


def test_a_layer_that_skips_may_come_without_rows_on_a_warm_up_step():
    """The eager adapters keep no rows of a layer on a step whose refresh it skips: the core
    takes such a step (the layer's factors unchanged) and still refuses missing rows on a
    step that refreshes every layer."""
    mlp = MLP(SHAPE, activation="tanh", loss="softmax_ce")
    opt = gc.ring(**KW, warmup_rows=1.1)
    rs = np.random.default_rng(0)
    x, y = rs.normal(size=(B, SHAPE[0])), np.eye(SHAPE[-1])[rs.integers(0, SHAPE[-1], B)]
    params = mlp.init(seed=1)
    state = opt.init(params, layers=mlp_layers(mlp))
    full = mlp.stats(params, x, y)
    _, state = opt.update(mlp.grad(params, x, y), state, params, stats=full)
    x2 = rs.normal(size=(B, SHAPE[0]))
    only_last = gc.Stats(layers=mlp.stats(params, x2, y).layers[1:])
    _, after = opt.update(mlp.grad(params, x2, y), state, params, stats=only_last)
    np.testing.assert_array_equal(after.curvature.kfac[0].A, state.curvature.kfac[0].A)
    assert not np.array_equal(after.curvature.kfac[1].A, state.curvature.kfac[1].A)
    # explicit flags as NumPy bools (an adapter's own schedule), no K-FAC rows at all
    _, again = opt.update(mlp.grad(params, x2, y), after, params, stats=gc.Stats(),
                          curvature=np.bool_(True), inverse=np.bool_(True),
                          steady=(np.bool_(False), np.bool_(False)))
    np.testing.assert_array_equal(again.curvature.kfac[0].A, after.curvature.kfac[0].A)
    np.testing.assert_array_equal(again.curvature.kfac[1].A, after.curvature.kfac[1].A)
    _, after2 = opt.update(mlp.grad(params, x, y), after, params, stats=full)
    with pytest.raises(ValueError, match="no statistics for the layer"):
        opt.update(mlp.grad(params, x, y), after2, params, stats=only_last)  # step 3: all
