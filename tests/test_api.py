"""The public API: containers, errors that name the problem, schedules and the update tail."""

import warnings

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from tests.helpers import mlp_layers, rel_err


@pytest.fixture
def small():
    rs = np.random.default_rng(7)
    mlp = MLP((3, 4, 2))
    x = rs.normal(size=(5, 3))
    y = np.eye(2)[rs.integers(0, 2, 5)]
    return mlp, mlp.init(seed=0), x, y


def test_mixed_array_libraries_are_named(small):
    torch = pytest.importorskip("torch")
    mlp, params, x, y = small
    opt = gc.ring(structure="diagonal")
    state = opt.init(params)
    grads = [torch.from_numpy(g) for g in mlp.grad(params, x, y)]
    with pytest.raises(TypeError, match=r"numpy \(in params\).*torch \(in grads\)"):
        opt.update(grads, state, params)


def test_missing_oracle_is_named(small):
    mlp, params, x, y = small
    for gr, field in (("double_backprop", "hvp_fn"), ("finite_difference", "grad_fn")):
        opt = gc.reng(structure="diagonal", gr=gr)
        assert getattr(opt.requirements, field)
        with pytest.raises(ValueError, match=field):
            opt.update(mlp.grad(params, x, y), opt.init(params), params)


def test_ngd_baseline_needs_no_oracle(small):
    mlp, params, x, y = small
    opt = gc.reng(rho=0.0, structure="diagonal")
    assert not opt.requirements.hvp_fn and not opt.requirements.grad_fn
    opt.update(mlp.grad(params, x, y), opt.init(params), params)


def test_missing_stats_and_layout_are_named(small):
    mlp, params, x, y = small
    opt = gc.ring(structure="kfac")
    with pytest.raises(ValueError, match="layers="):
        opt.init(params)
    state = opt.init(params, layers=mlp_layers(mlp))
    with pytest.raises(ValueError, match="stats.layers"):
        opt.update(mlp.grad(params, x, y), state, params)
    with pytest.raises(ValueError, match="per_example_grads"):
        w = gc.ring(structure="woodbury")
        w.update(mlp.grad(params, x, y), w.init(params), params)


def test_kfac_without_layers_is_the_diagonal(small):
    mlp, params, x, y = small
    g = mlp.grad(params, x, y)
    a, _ = gc.ring(structure="kfac").update(g, gc.ring(structure="kfac").init(params, layers=[]),
                                           params)
    b, _ = gc.ring(structure="diagonal").update(g, gc.ring(structure="diagonal").init(params),
                                               params)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_bad_containers_and_shapes(small):
    mlp, params, x, y = small
    opt = gc.ring(structure="diagonal")
    with pytest.raises(TypeError, match="list, tuple or dict"):
        opt.init(params[0])
    state = opt.init(params)
    bad = mlp.grad(params, x, y)
    bad[1] = bad[1][:-1]
    with pytest.raises(ValueError, match="grads leaf 1 has shape"):
        opt.update(bad, state, params)
    with pytest.raises(TypeError, match="dtype"):
        opt.init([np.zeros(3, dtype=np.int64)])
    ints = mlp.grad(params, x, y)
    ints[0] = np.ones(ints[0].shape, dtype=np.int64)
    with pytest.raises(ValueError, match="grads leaf 0 has dtype int64"):
        opt.update(ints, state, params)


@pytest.mark.parametrize("structure", ["diagonal", "kfac"])
def test_a_state_built_for_other_params_is_named(small, structure):
    """A state from another params tree (fewer leaves; the same count, other shapes) is
    refused before anything runs, not by a broadcasting error inside the step."""
    mlp, params, x, y = small
    opt = gc.ring(structure=structure, momentum=0.5)
    layers = mlp_layers(mlp) if structure == "kfac" else None
    grads = mlp.grad(params, x, y)
    stats = gc.Stats(layers=mlp.batch(params, x, y, layer_stats=True).layers) if layers else None
    fewer = opt.init(params[:2], layers=layers[:1] if layers else None)
    with pytest.raises(ValueError, match=r"state does not match params: .* 2 .*params has 4"):
        opt.update(grads, fewer, params, stats=stats)
    other = MLP((3, 5, 2))
    reshaped = opt.init(other.init(seed=0), layers=mlp_layers(other) if layers else None)
    with pytest.raises(ValueError, match=r"state does not match params: .*(diagonal|K-FAC)"):
        opt.update(grads, reshaped, params, stats=stats)
    opt.update(grads, opt.init(params, layers=layers), params, stats=stats)  # the right one


def test_unpaired_rows_are_named_by_the_first_step_check_too(small):
    """The first step's check (`unexplained`, before any update) names rows that do not pair
    as the update does, not with a matmul error."""
    mlp, params, x, y = small
    opt = gc.ring(structure="kfac")
    state = opt.init(params, layers=mlp_layers(mlp))
    b = mlp.batch(params, x, y, layer_stats=True)
    short = b.layers[0]._replace(inputs=b.layers[0].inputs[:-1])
    stats = gc.Stats(layers=[short, *b.layers[1:]])
    for run in (lambda: opt.unexplained(b.grads, state, params, stats),
                lambda: opt.update(b.grads, state, params, stats=stats)):
        with pytest.raises(ValueError, match="inputs have 4 rows, output_grads 5: they must "
                                             "pair row for row"):
            run()


def test_shared_weight_rows_without_batch_size_warn(small):
    """A layer's rows (here two positions per example) given without batch_size are taken for
    as many examples; another layer's batch of B tells the mistake, and it is named."""
    mlp, params, x, y = small
    opt = gc.ring(structure="kfac")
    state = opt.init(params, layers=mlp_layers(mlp))
    b = mlp.batch(params, x, y, layer_stats=True)
    first = b.layers[0]
    twice = first._replace(inputs=np.concatenate([first.inputs] * 2),
                           output_grads=np.concatenate([first.output_grads] * 2))
    with pytest.warns(UserWarning, match=r"10 rows and no batch_size.*another layer's batch is "
                                         r"5.*batch_size=B"):
        opt.update(b.grads, state, params, stats=gc.Stats(layers=[twice, *b.layers[1:]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.update(b.grads, state, params,
                   stats=gc.Stats(layers=[twice._replace(batch_size=5), *b.layers[1:]]))


def test_bad_per_example_grads_and_oracle_results_are_named(small):
    """Named before anything changes, not left to a reshape or broadcast error."""
    mlp, params, x, y = small
    g = mlp.grad(params, x, y)
    w = gc.ring(structure="woodbury")
    state = w.init(params)
    pe = [np.zeros((0, *p.shape)) for p in params]
    with pytest.raises(ValueError, match="empty batch"):
        w.update(g, state, params, stats=gc.Stats(per_example_grads=pe))
    pe = [np.zeros((5, *p.shape)) for p in params]
    pe[1] = pe[1][0]
    with pytest.raises(ValueError, match=r"leaf 1 has shape .*a leading axis of the batch's 5"):
        w.update(g, state, params, stats=gc.Stats(per_example_grads=pe))
    reng = gc.reng(structure="diagonal")

    def transposed_hvp(p, v):
        return [h.T for h in mlp.hvp(p, x, y, v)]
    with pytest.raises(ValueError, match=r"returned leaf 0 of shape \(3, 4\), the parameter's"):
        reng.update(g, reng.init(params), params,
                    oracle=gc.Oracle(hvp_fn=transposed_hvp))


def test_schedules_are_called_with_the_step(small):
    mlp, params, x, y = small
    seen = []

    def lr(t):
        seen.append(int(t))
        return 0.1 / t

    opt = gc.ring(lr=lr, structure="diagonal", rho=0.0)
    ref = gc.ring(lr=0.05, structure="diagonal", rho=0.0)
    s1, s2 = opt.init(params), ref.init(params)
    g = mlp.grad(params, x, y)
    _, s1 = opt.update(g, s1, params)
    _, s2 = ref.update(g, s2, params)
    u1, _ = opt.update(g, s1, params)
    u2, _ = ref.update(g, s2, params)
    assert seen == [1, 1, 2]  # t = 1 once more when the builder checks the schedule
    assert all(rel_err(a, b) < 1e-15 for a, b in zip(u1, u2))


def test_update_tail_momentum_weight_decay_and_kl_clip(small):
    """§3 tail against its closed form, with the diagonal direction d = g/(g² + λ)."""
    mlp, params, x, y = small
    lr, mu, wd, lam, kappa = 0.3, 0.9, 0.01, 0.5, 1e-4
    opt = gc.ring(lr=lr, rho=0.0, damping=lam, structure="diagonal", momentum=mu,
                  weight_decay=wd, ema_decay=0.0, kl_clip=kappa, curvature_every=1)
    state = opt.init(params)
    m = [np.zeros_like(p) for p in params]
    p = params
    for _ in range(3):
        g = mlp.grad(p, x, y)
        d = [gi / (gi * gi + lam) for gi in g]
        nu = min(1.0, np.sqrt(kappa / (lr**2 * abs(sum(np.sum(a * b) for a, b in zip(d, g))))))
        m = [mu * mi + nu * di for mi, di in zip(m, d)]
        expected = [pi - lr * mi - lr * wd * pi for pi, mi in zip(p, m)]
        upd, state = opt.update(g, state, p)
        p = gc.apply_updates(p, upd)
        assert all(rel_err(a, b) < 1e-13 for a, b in zip(p, expected))
    assert nu < 1.0  # the clip was active


@pytest.mark.parametrize("name", ["reng", "ring", "rkalman"])
def test_the_kl_clip_is_on_by_default_and_none_or_inf_turn_it_off(small, name):
    """The recommended defaults (README "Defaults"): κ = 1e-3 unless given; None and inf are
    the same update as no clip (the closed form of the test above with ν = 1); R-Kalman's belief
    damping defaults to 1e-2, RENG's and RING's to 1e-3."""
    mlp, params, x, y = small
    build = getattr(gc, name)
    assert build().config.kl_clip == 1e-3
    assert build().config.damping == (1e-2 if name == "rkalman" else 1e-3)
    g = mlp.grad(params, x, y)
    kw = dict(lr=0.3, rho=0.0, damping=0.5, structure="diagonal", ema_decay=0.0)
    default, _ = build(**kw).update(g, build(**kw).init(params), params)
    off = [build(**kw, kl_clip=k).update(g, build(**kw).init(params), params)[0]
           for k in (None, float("inf"))]
    d = [-u / 0.3 for u in off[0]]  # the unclipped direction (ĝ = g at rho = 0)
    nu = min(1.0, np.sqrt(1e-3 / (0.3**2 * abs(sum(np.sum(a * b) for a, b in zip(d, g))))))
    assert nu < 1.0
    for u0, u1, u2 in zip(default, *off):
        assert rel_err(u2, u1) < 1e-15
        assert rel_err(u0, nu * u1) < 1e-13


def test_ring_rejects_rho_damping_above_one():
    with pytest.raises(ValueError, match=r"rho\*damping.*0 <= rho\*damping <= 1"):
        gc.ring(rho=10.0, damping=0.5, form="gauss_newton")


def test_dict_params_and_bfloat16_state_dtype():
    torch = pytest.importorskip("torch")
    params = {"w": torch.ones(3, 2, dtype=torch.bfloat16)}
    opt = gc.ring(structure="diagonal", momentum=0.5)
    state = opt.init(params)
    assert state.momentum[0].dtype == torch.float32
    upd, state = opt.update({"w": torch.full((3, 2), 0.5, dtype=torch.bfloat16)}, state, params)
    assert upd["w"].dtype == torch.bfloat16
    assert state.curvature.diagonal[0].dtype == torch.float32


def test_oracle_results_with_the_keys_in_another_order_are_refused():
    """Same shapes, other key order: ĝ would land on the wrong leaves, silently."""
    params = {"a": np.ones(3), "b": np.ones(3)}
    g = {"a": np.full(3, 0.1), "b": np.full(3, -0.2)}
    opt = gc.reng(structure="diagonal", gr="finite_difference")

    def reordered(p):
        return {"b": p["b"] * 0.1, "a": p["a"] * 0.2}
    with pytest.raises(ValueError, match=r"returned keys \('b', 'a'\)"):
        opt.update(g, opt.init(params), params, oracle=gc.Oracle(grad_fn=reordered))


def test_an_along_fn_without_the_key_keyword_still_works():
    """`Oracle.along_fn(c)` as documented before the key (a part's shifted pass): called
    without it."""
    params = [np.ones(3)]
    g = [np.full(3, 0.1)]
    calls = []

    def along(c):
        calls.append(float(c))
        return [gi * 1.5 for gi in g]
    opt = gc.reng(structure="diagonal", gr="finite_difference")
    oracle = gc.Oracle(grad_fn=lambda p: g, along_fn=along)
    pending = opt.prepare(g, opt.init(params), params, oracle=oracle,
                          whole=gc.Whole(grad_sq_norm=np.asarray(0.03)))
    opt.finish(pending)
    assert len(calls) == 1 and calls[0] > 0


@pytest.mark.parametrize("build", [gc.ring, gc.reng, gc.rkalman], ids=["ring", "reng", "rkalman"])
def test_a_layer_with_no_rows_is_absent(small, build):
    """Statistics of no rows (a mixture of experts' expert no token was routed to) are that
    layer's absence (`Stats.absent`), not a 0/0 in its factors (before: a skipped step, and
    R-Kalman's ZeroDivisionError)."""
    mlp, params, x, y = small
    opt = build(structure="kfac")
    state = opt.init(params, layers=mlp_layers(mlp))
    b = mlp.batch(params, x, y, layer_stats=True)
    first = b.layers[0]
    empty = first._replace(inputs=first.inputs[:0], output_grads=first.output_grads[:0])
    oracle = mlp.oracle(x, y)
    got_u, got_s = opt.update(b.grads, state, params, oracle=oracle,
                              stats=gc.Stats(layers=[empty, *b.layers[1:]]))
    ref_u, ref_s = opt.update(b.grads, state, params, oracle=oracle,
                              stats=gc.Stats(layers=list(b.layers[1:]), absent=(first.weight,)))
    assert int(got_s.skipped) == 0
    for u, r in zip(got_u, ref_u):
        np.testing.assert_array_equal(u, r)
    np.testing.assert_array_equal(got_s.curvature.kfac[0].A, ref_s.curvature.kfac[0].A)
