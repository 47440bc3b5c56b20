"""The reference MLP: gradients, per-example gradients, layer statistics and exact HVPs,
checked against finite differences and torch autograd, and across array backends."""

from __future__ import annotations

import itertools

import array_api_compat
import numpy as np
import pytest

from grng_core.reference import (
    MLP,
    Batch,
    ill_conditioned_least_squares,
    ill_conditioned_logistic,
    least_squares_optimum,
    load_digits_split,
    to_numpy,
)
from grng_core.types import LayerStats, Oracle, Stats
from tests.backends import BACKEND_NAMES, get_backend

SIZES = (4, 6, 5, 3)
B = 7
COMBOS = list(itertools.product(("tanh", "relu"), ("softmax_ce", "mse")))
ALL_BACKENDS = [*BACKEND_NAMES, "array_api_strict_device1"]


def _problem(activation="tanh", loss="softmax_ce", seed=0, sizes=SIZES, bias=True):
    mlp = MLP(sizes, activation=activation, loss=loss, bias=bias)
    rng = np.random.default_rng(seed + 100)
    x = rng.standard_normal((B, sizes[0]))
    if loss == "softmax_ce":
        y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], B)]
    else:
        y = rng.standard_normal((B, sizes[-1]))
    v = [rng.standard_normal(s) for s in mlp.shapes]
    return mlp, mlp.init(seed=seed), x, y, v


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def _assert_close(got, want, rtol):
    for g, w in zip(got, want, strict=True):
        assert np.shape(g) == np.shape(w)
        assert _rel(g, w) <= rtol, (_rel(g, w), rtol)


def _flat(leaves):
    return np.concatenate([np.ravel(p) for p in leaves])


def _unflat(vec, like):
    out, i = [], 0
    for p in like:
        out.append(vec[i:i + p.size].reshape(p.shape))
        i += p.size
    return out


def _np(a):
    return a if isinstance(a, np.ndarray) else np.asarray(a)


# --------------------------------------------------------------- finite differences


@pytest.mark.parametrize("activation,loss", COMBOS)
def test_grads_match_finite_differences(activation, loss):
    mlp, params, x, y, _ = _problem(activation, loss)
    theta, h = _flat(params), 1e-5
    fd = np.empty_like(theta)
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = h
        lp = float(mlp.loss(_unflat(theta + e, params), x, y))
        lm = float(mlp.loss(_unflat(theta - e, params), x, y))
        fd[j] = (lp - lm) / (2 * h)
    assert _rel(_flat(mlp.grad(params, x, y)), fd) < 1e-6


@pytest.mark.parametrize("loss", ["softmax_ce", "mse"])
def test_hvp_matches_finite_differences_of_grads(loss):
    mlp, params, x, y, v = _problem("tanh", loss)
    h = 1e-5
    plus = mlp.grad([p + h * u for p, u in zip(params, v)], x, y)
    minus = mlp.grad([p - h * u for p, u in zip(params, v)], x, y)
    fd = [(a - b) / (2 * h) for a, b in zip(plus, minus)]
    assert _rel(_flat(mlp.hvp(params, x, y, v)), _flat(fd)) < 1e-7


# ------------------------------------------------------------------ torch autograd


def _torch_reference(mlp, params, x, y, v):
    torch = pytest.importorskip("torch")
    p = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in params]
    xt, yt = torch.tensor(x), torch.tensor(y)
    a = xt
    for k in range(mlp.n_layers):
        wi, bi = mlp.layer_keys(k)
        z = a @ p[wi].T + (p[bi] if bi is not None else 0.0)
        if k < mlp.n_layers - 1:
            a = torch.tanh(z) if mlp.activation == "tanh" else torch.relu(z)
    if mlp.loss_name == "softmax_ce":
        loss = -(yt * torch.log_softmax(z, dim=-1)).sum(-1).mean()
    else:
        loss = 0.5 * ((z - yt) ** 2).sum(-1).mean()
    g = torch.autograd.grad(loss, p, create_graph=True)
    gv = sum((gi * torch.tensor(vi)).sum() for gi, vi in zip(g, v))
    hv = torch.autograd.grad(gv, p)
    return (loss.item(), [gi.detach().numpy() for gi in g], [h.numpy() for h in hv])


@pytest.mark.parametrize("activation,loss", COMBOS)
@pytest.mark.parametrize("bias", [True, False])
def test_loss_grad_hvp_match_torch_autograd(activation, loss, bias):
    mlp, params, x, y, v = _problem(activation, loss, bias=bias)
    v = [np.random.default_rng(3 + i).standard_normal(p.shape) for i, p in enumerate(params)]
    t_loss, t_grad, t_hvp = _torch_reference(mlp, params, x, y, v)
    assert abs(float(mlp.loss(params, x, y)) - t_loss) <= 1e-12 * abs(t_loss)
    _assert_close(mlp.grad(params, x, y), t_grad, 1e-12)
    _assert_close(mlp.hvp(params, x, y, v), t_hvp, 1e-10)


def test_hvp_soft_targets_match_torch():
    """Non-one-hot (unnormalised) targets: the loss Hessian carries the factor Σ_c y_c."""
    mlp, params, x, _, v = _problem("tanh", "softmax_ce")
    y = np.random.default_rng(5).random((B, SIZES[-1]))
    _, t_grad, t_hvp = _torch_reference(mlp, params, x, y, v)
    _assert_close(mlp.grad(params, x, y), t_grad, 1e-12)
    _assert_close(mlp.hvp(params, x, y, v), t_hvp, 1e-10)


def test_hvp_is_symmetric_and_linear():
    mlp, params, x, y, v = _problem("tanh", "softmax_ce")
    u = [np.random.default_rng(9).standard_normal(p.shape) for p in params]
    hv, hu = _flat(mlp.hvp(params, x, y, v)), _flat(mlp.hvp(params, x, y, u))
    scale = np.linalg.norm(hv) * np.linalg.norm(_flat(u))
    assert abs(_flat(u) @ hv - _flat(v) @ hu) <= 1e-12 * scale
    w = [2.0 * a - 3.0 * b for a, b in zip(u, v)]
    assert _rel(_flat(mlp.hvp(params, x, y, w)), 2.0 * hu - 3.0 * hv) < 1e-13


# ------------------------------------------------------- per-example and layer stats


@pytest.mark.parametrize("activation,loss", COMBOS)
def test_per_example_grads(activation, loss):
    mlp, params, x, y, _ = _problem(activation, loss)
    out = mlp.batch(params, x, y, per_example=True)
    assert isinstance(out, Batch) and out.layers is None
    for pe, g, p in zip(out.per_example_grads, out.grads, params):
        assert pe.shape == (B, *p.shape)
        assert np.max(np.abs(pe.mean(axis=0) - g)) <= 1e-12 * max(np.max(np.abs(g)), 1.0)
    for i in range(B):
        gi = mlp.grad(params, x[i:i + 1], y[i:i + 1])
        _assert_close([pe[i] for pe in out.per_example_grads], gi, 1e-12)


@pytest.mark.parametrize("activation,loss", COMBOS)
def test_layer_stats_reproduce_grads(activation, loss):
    mlp, params, x, y, _ = _problem(activation, loss)
    out = mlp.batch(params, x, y, layer_stats=True)
    assert len(out.layers) == mlp.n_layers
    for k, ls in enumerate(out.layers):
        assert isinstance(ls, LayerStats)
        assert (ls.weight, ls.bias, ls.transposed) == (2 * k, 2 * k + 1, False)
        assert ls.inputs.shape == (B, SIZES[k]) and ls.output_grads.shape == (B, SIZES[k + 1])
        a1 = np.concatenate([ls.inputs, np.ones((B, 1))], axis=1)
        g = ls.output_grads.T @ a1 / B
        want = np.concatenate([out.grads[ls.weight], out.grads[ls.bias][:, None]], axis=1)
        assert np.max(np.abs(g - want)) <= 1e-12 * max(np.max(np.abs(want)), 1.0)


@pytest.mark.parametrize("loss", ["softmax_ce", "mse"])
def test_stat_targets(loss):
    mlp, params, x, y, _ = _problem("tanh", loss)
    t = mlp.sample_targets(params, x, seed=1)
    assert not np.array_equal(t, y)
    base = mlp.batch(params, x, y, per_example=True, layer_stats=True)
    mc = mlp.batch(params, x, y, per_example=True, layer_stats=True, stat_targets=t)
    # the loss, gradient and per-example gradients still use y
    assert float(mc.loss) == float(base.loss)
    _assert_close(mc.grads, base.grads, 0.0)
    _assert_close(mc.per_example_grads, base.per_example_grads, 0.0)
    # the layer statistics are those of the loss with targets t
    g_t = mlp.grad(params, x, t)
    for lb, lm in zip(base.layers, mc.layers):
        np.testing.assert_array_equal(lm.inputs, lb.inputs)
        assert not np.allclose(lm.output_grads, lb.output_grads)
        a1 = np.concatenate([lm.inputs, np.ones((B, 1))], axis=1)
        want = np.concatenate([g_t[lm.weight], g_t[lm.bias][:, None]], axis=1)
        assert _rel(lm.output_grads.T @ a1 / B, want) < 1e-12
    # stat_targets=y changes nothing
    same = mlp.batch(params, x, y, layer_stats=True, stat_targets=y)
    for lb, ls in zip(base.layers, same.layers):
        np.testing.assert_array_equal(ls.output_grads, lb.output_grads)


def test_stats_kinds_and_oracle():
    mlp, params, x, y, v = _problem("relu", "softmax_ce")
    t = mlp.sample_targets(params, x, seed=2)
    st = mlp.stats(params, x, y, kind="both", stat_targets=t)
    assert isinstance(st, Stats)
    ref = mlp.batch(params, x, t, per_example=True, layer_stats=True)
    _assert_close(st.per_example_grads, ref.per_example_grads, 0.0)
    for a, b in zip(st.layers, ref.layers):
        np.testing.assert_array_equal(a.output_grads, b.output_grads)
    assert mlp.stats(params, x, y, kind="layers").per_example_grads is None
    assert mlp.stats(params, x, y, kind="per_example").layers is None
    with pytest.raises(ValueError, match="kind"):
        mlp.stats(params, x, y, kind="diag")
    oracle = mlp.oracle(x, y)
    assert isinstance(oracle, Oracle)
    _assert_close(oracle.grad_fn(params), mlp.grad(params, x, y), 0.0)
    _assert_close(oracle.hvp_fn(params, v), mlp.hvp(params, x, y, v), 0.0)


def test_no_bias_layout():
    mlp, params, x, y, _ = _problem("tanh", "mse", bias=False)
    assert [p.shape for p in params] == [(6, 4), (5, 6), (3, 5)]
    layers = mlp.batch(params, x, y, layer_stats=True).layers
    assert [(ls.weight, ls.bias) for ls in layers] == [(0, None), (1, None), (2, None)]
    g = mlp.grad(params, x, y)
    for ls in layers:
        assert _rel(ls.output_grads.T @ ls.inputs / B, g[ls.weight]) < 1e-12


def test_validation_and_init():
    with pytest.raises(ValueError, match="activation"):
        MLP((2, 3), activation="gelu")
    with pytest.raises(ValueError, match="loss"):
        MLP((2, 3), loss="hinge")
    with pytest.raises(ValueError, match="sizes"):
        MLP((2,))
    mlp = MLP((4, 8, 3))
    p0, p1 = mlp.init(seed=0), mlp.init(seed=0)
    assert [p.shape for p in p0] == [(8, 4), (8,), (3, 8), (3,)]
    assert all(isinstance(p, np.ndarray) and p.dtype == np.float64 for p in p0)
    _assert_close(p0, p1, 0.0)
    assert not np.array_equal(p0[0], mlp.init(seed=1)[0])
    with pytest.raises(ValueError, match="params"):
        mlp.loss(p0[:3], np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="x must have shape"):
        mlp.loss(p0, np.zeros((2, 5)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="y must have shape"):
        mlp.loss(p0, np.zeros((2, 4)), np.zeros((2, 4)))


def test_sample_targets_distribution():
    mlp = MLP((3, 4), activation="tanh", loss="softmax_ce")
    params = mlp.init(seed=0)
    x = np.tile(np.array([[0.5, -1.0, 2.0]]), (20000, 1))
    t = mlp.sample_targets(params, x, seed=0)
    assert t.shape == (20000, 4) and np.all(t.sum(axis=1) == 1.0)
    np.testing.assert_array_equal(t, mlp.sample_targets(params, x, seed=0))
    z = mlp.forward(params, x[:1])[0]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.max(np.abs(t.mean(axis=0) - p)) < 0.015
    reg = MLP((3, 2), loss="mse")
    rp = reg.init(seed=0)
    noise = reg.sample_targets(rp, x, seed=0) - reg.forward(rp, x)
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1.0) < 0.03


# ---------------------------------------------------------------- across backends


def _device_of(x):
    return array_api_compat.device(x)


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("activation,loss", COMBOS)
def test_backends_agree_with_numpy(name, activation, loss):
    be = get_backend(name)
    mlp, params, x, y, v = _problem(activation, loss)
    t = mlp.sample_targets(params, x, seed=4)
    ref = mlp.batch(params, x, y, per_example=True, layer_stats=True, stat_targets=t)
    ref_hvp = mlp.hvp(params, x, y, v)
    ref_st = mlp.stats(params, x, y, kind="both")

    bp, bx, by, bv, bt = be.tree(params), be.asarray(x), be.asarray(y), be.tree(v), be.asarray(t)
    out = mlp.batch(bp, bx, by, per_example=True, layer_stats=True, stat_targets=bt)
    hv = mlp.hvp(bp, bx, by, bv)
    st = mlp.stats(bp, bx, by, kind="both")
    fwd = mlp.forward(bp, bx)
    loss_val = mlp.loss(bp, bx, by)
    arrays = [out.loss, loss_val, fwd, *out.grads, *out.per_example_grads, *hv,
              *st.per_example_grads]
    arrays += [a for ls in (*out.layers, *st.layers) for a in (ls.inputs, ls.output_grads)]
    dev = _device_of(bx)
    for a in arrays:
        assert array_api_compat.array_namespace(a) is array_api_compat.array_namespace(bx)
        assert _device_of(a) == dev
    if be.device is not None:
        assert dev == be.device

    n = be.to_numpy
    assert _rel(n(out.loss), ref.loss) < 1e-12 and _rel(n(loss_val), ref.loss) < 1e-12
    assert _rel(n(fwd), mlp.forward(params, x)) < 1e-12
    _assert_close([n(a) for a in out.grads], ref.grads, 1e-12)
    _assert_close([n(a) for a in out.per_example_grads], ref.per_example_grads, 1e-12)
    _assert_close([n(a) for a in hv], ref_hvp, 1e-12)
    _assert_close([n(a) for a in st.per_example_grads], ref_st.per_example_grads, 1e-12)
    for got_layers, want_layers in ((out.layers, ref.layers), (st.layers, ref_st.layers)):
        for gl, wl in zip(got_layers, want_layers):
            assert (gl.weight, gl.bias) == (wl.weight, wl.bias)
            assert _rel(n(gl.inputs), wl.inputs) < 1e-12
            assert _rel(n(gl.output_grads), wl.output_grads) < 1e-12


@pytest.mark.parametrize("loss", ["softmax_ce", "mse"])
def test_sample_targets_on_backend(backend, loss):
    mlp, params, x, _, _ = _problem("tanh", loss)
    bx = backend.asarray(x)
    t = mlp.sample_targets(backend.tree(params), bx, seed=3)
    assert array_api_compat.array_namespace(t) is array_api_compat.array_namespace(bx)
    assert t.dtype == bx.dtype and _device_of(t) == _device_of(bx)
    assert _rel(backend.to_numpy(t), mlp.sample_targets(params, x, seed=3)) < 1e-12
    assert _rel(to_numpy(t), backend.to_numpy(t)) == 0.0


def test_device1_sample_targets_and_init_like():
    be = get_backend("array_api_strict_device1")
    mlp, params, x, _, _ = _problem("relu", "softmax_ce")
    bx = be.asarray(x)
    t = mlp.sample_targets(be.tree(params), bx, seed=3)
    assert _device_of(t) == be.device
    np.testing.assert_array_equal(be.to_numpy(t), mlp.sample_targets(params, x, seed=3))
    p_like = mlp.init(seed=0, like=bx)
    assert all(_device_of(p) == be.device for p in p_like)
    _assert_close([be.to_numpy(p) for p in p_like], params, 0.0)


def test_float32_inputs(backend):
    mlp, params, x, y, v = _problem("tanh", "softmax_ce")
    bp, bx = backend.tree(params, "float32"), backend.asarray(x, "float32")
    by = backend.asarray(y, "float32")
    out = mlp.batch(bp, bx, by, per_example=True, layer_stats=True)
    hv = mlp.hvp(bp, bx, by, backend.tree(v, "float32"))
    assert all(g.dtype == bx.dtype for g in [out.loss, *out.grads, *hv])
    _assert_close([backend.to_numpy(g) for g in out.grads], mlp.grad(params, x, y), 1e-5)
    _assert_close([backend.to_numpy(h) for h in hv], mlp.hvp(params, x, y, v), 1e-5)


@pytest.mark.parametrize("activation,loss", COMBOS)
def test_jax_jit(activation, loss):
    pytest.importorskip("jax")
    import jax

    be = get_backend("jax")
    mlp, params, x, y, v = _problem(activation, loss)
    bp, bx, by, bv = be.tree(params), be.asarray(x), be.asarray(y), be.tree(v)
    loss_fn = jax.jit(mlp.loss)
    grad_fn = jax.jit(mlp.grad)
    hvp_fn = jax.jit(mlp.hvp)
    batch_fn = jax.jit(lambda p, a, b, t: mlp.batch(p, a, b, per_example=True,
                                                    layer_stats=True, stat_targets=t))
    assert _rel(np.asarray(loss_fn(bp, bx, by)), mlp.loss(params, x, y)) < 1e-12
    _assert_close([np.asarray(g) for g in grad_fn(bp, bx, by)], mlp.grad(params, x, y), 1e-12)
    _assert_close([np.asarray(h) for h in hvp_fn(bp, bx, by, bv)], mlp.hvp(params, x, y, v),
                  1e-12)
    out = batch_fn(bp, bx, by, by)
    ref = mlp.batch(params, x, y, per_example=True, layer_stats=True)
    _assert_close([np.asarray(g) for g in out.per_example_grads], ref.per_example_grads, 1e-12)
    for gl, wl in zip(out.layers, ref.layers):
        assert _rel(np.asarray(gl.output_grads), wl.output_grads) < 1e-12
    # the oracle's callables trace too
    oracle = mlp.oracle(bx, by)
    _assert_close([np.asarray(h) for h in jax.jit(oracle.hvp_fn)(bp, bv)],
                  mlp.hvp(params, x, y, v), 1e-12)


# --------------------------------------------------------------------------- data


def test_load_digits_split():
    pytest.importorskip("sklearn")
    d = load_digits_split(seed=0, test_fraction=0.25)
    n_tr, n_te = d.x_train.shape[0], d.x_test.shape[0]
    assert n_tr + n_te == 1797 and abs(n_te - 0.25 * 1797) <= 10
    assert d.x_train.shape[1] == 64 and d.x_train.dtype == np.float64
    assert d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0 and d.x_train.max() == 1.0
    assert d.y_train.shape == (n_tr, 10) and np.all(d.y_train.sum(axis=1) == 1.0)
    np.testing.assert_array_equal(d.y_test.argmax(axis=1), d.labels_test)
    np.testing.assert_array_equal(np.bincount(d.labels_train, minlength=10) > 120, True)
    again = load_digits_split(seed=0, test_fraction=0.25)
    np.testing.assert_array_equal(again.x_train, d.x_train)
    other = load_digits_split(seed=1, test_fraction=0.25)
    assert not np.array_equal(other.labels_train, d.labels_train)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.5)


def test_ill_conditioned_least_squares():
    prob = ill_conditioned_least_squares(200, 10, cond=1e4, seed=0)
    x, y = prob.x, prob.y
    assert x.shape == (200, 10) and y.shape == (200, 1) and prob.w_opt.shape == (10, 1)
    ev = np.linalg.eigvalsh(x.T @ x / 200)
    assert abs(ev.max() / ev.min() / 1e4 - 1.0) < 1e-6 and abs(ev.max() - 1.0) < 1e-10
    # log-uniform spectrum
    np.testing.assert_allclose(np.diff(np.log(np.sort(ev))), np.log(1e4) / 9, rtol=1e-6)
    # the optimum zeroes the MLP's gradient and matches lstsq
    mlp = MLP((10, 1), loss="mse", bias=False)
    g = mlp.grad([prob.w_opt.T], x, y)[0]
    assert np.max(np.abs(g)) < 1e-10
    w2, l2 = least_squares_optimum(x, y)
    assert _rel(w2, prob.w_opt) < 1e-8 and abs(l2 - prob.loss_opt) < 1e-12
    assert abs(float(mlp.loss([prob.w_opt.T], x, y)) - prob.loss_opt) < 1e-12
    np.testing.assert_array_equal(ill_conditioned_least_squares(200, 10, 1e4, seed=0).x, x)
    with pytest.raises(ValueError):
        ill_conditioned_least_squares(5, 10, 10.0)
    with pytest.raises(ValueError):
        ill_conditioned_least_squares(50, 10, 0.5)


def test_ill_conditioned_logistic():
    prob = ill_conditioned_logistic(500, 8, cond=100.0, seed=1)
    ev = np.linalg.eigvalsh(prob.x.T @ prob.x / 500)
    assert abs(ev.max() / ev.min() / 100.0 - 1.0) < 1e-8
    assert prob.y.shape == (500, 2) and set(np.unique(prob.labels)) <= {0, 1}
    np.testing.assert_array_equal(prob.y.argmax(axis=1), prob.labels)
    assert 50 < prob.labels.sum() < 450
    mlp = MLP((8, 2), loss="softmax_ce", bias=False)
    assert np.isfinite(float(mlp.loss(mlp.init(seed=0), prob.x, prob.y)))
