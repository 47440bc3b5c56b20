"""flax.nnx layers get K-FAC through hooks on their call methods (no model change).
Reference: the same network as a flax.linen model (whose Conv / Embed / Dense steps equal the
torch adapter's and whose attention equals 2-D kernels, tests/jax/test_flax_layers.py), with the
same weights; 3 RING steps in float64 agree to 1e-9. nnx runs through ``nnx.Optimizer``.
Calls inside flax.linen's nn.scan / nn.remat are refused naming the transformation."""

from __future__ import annotations

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.jax.test_flax_layers import (
    CLASSES,
    HP,
    STEPS,
    B,
    D,
    Explicit,
    FlaxCNN,
    FlaxEmbed,
    H,
    _ce,
    _jax_run,
)

nnx = pytest.importorskip("flax.nnx")
F64 = dict(param_dtype=jnp.float64)


def _nnx_run(model, x, y, lr=0.1):
    opt = nnx.Optimizer(model, grng_jax.ring(lr, **HP), wrt=nnx.Param)

    def loss(m, b):
        return _ce(m(b[0]), b[1])

    @nnx.jit
    def step(model, opt, b):
        loss_fn = grng_jax.nnx_loss_fn(model, loss)  # before the gradient pass (README)
        g = nnx.grad(loss)(model, b)
        opt.update(model, g, loss_fn=loss_fn, batch=b)

    for _ in range(STEPS):
        step(model, opt, (x, y))
    return opt


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), strides=2, padding=1, rngs=rngs, **F64)
        self.fc = nnx.Linear(3, CLASSES, rngs=rngs, **F64)

    def __call__(self, x):
        return self.fc(jnp.tanh(self.conv(x)).mean((1, 2)))


def _linen(mod):
    return {"kernel": mod.kernel[...], "bias": mod.bias[...]}


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_nnx_conv_and_linear_equal_flax_linen():
    rs = np.random.default_rng(0)
    x, y = jnp.asarray(rs.normal(size=(B, 7, 6, 2))), jnp.asarray(rs.integers(0, CLASSES, B))
    m = NnxCNN(nnx.Rngs(0))
    params = {"params": {"Conv_0": _linen(m.conv), "Dense_0": _linen(m.fc)}}
    before = np.asarray(m.conv.kernel[...])
    opt = _nnx_run(m, x, y)
    ref = _jax_run(FlaxCNN(), params, x, y, expect_layers=2)["params"]
    _close(m.conv.kernel[...], ref["Conv_0"]["kernel"])
    _close(m.fc.kernel[...], ref["Dense_0"]["kernel"])
    assert np.abs(np.asarray(m.conv.kernel[...]) - before).max() > 1e-3
    report = grng_jax.describe(opt.tx, opt.opt_state, nnx.state(m, nnx.Param))
    assert report.kfac_share == 1.0
    assert {e.layer for e in report.entries} == {"conv", "fc"}


class NnxEmbed(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(10, 4, rngs=rngs, **F64)
        self.fc = nnx.Linear(4, CLASSES, rngs=rngs, **F64)

    def __call__(self, ids):
        return self.fc(jnp.tanh(self.emb(ids)).mean(1))


def test_nnx_embed_equals_flax_linen():
    rs = np.random.default_rng(0)
    ids = jnp.asarray(rs.integers(0, 8, size=(B, 5)))
    y = jnp.asarray(rs.integers(0, CLASSES, B))
    m = NnxEmbed(nnx.Rngs(0))
    params = {"params": {"Embed_0": {"embedding": m.emb.embedding[...]},
                         "Dense_0": _linen(m.fc)}}
    _nnx_run(m, ids, y)
    ref = _jax_run(FlaxEmbed(), params, ids, y, expect_layers=2)["params"]
    _close(m.emb.embedding[...], ref["Embed_0"]["embedding"])
    _close(m.fc.kernel[...], ref["Dense_0"]["kernel"])


class NnxAttention(nnx.Module):
    def __init__(self, rngs):
        self.att = nnx.MultiHeadAttention(H, D, D, decode=False, rngs=rngs, **F64)
        self.fc = nnx.Linear(D, CLASSES, rngs=rngs, **F64)

    def __call__(self, x):
        return self.fc(self.att(x).mean(1))


def test_nnx_attention_projections_equal_two_dimensional_kernels():
    """nnx.MultiHeadAttention's LinearGeneral projections, kernels (d, heads, head_dim) and
    (heads, head_dim, d). nnx's attention itself differs from the explicit one by ~4e-7
    relative in float64 (its query scaling), so the steps are compared to 1e-5: a wrong
    K-FAC factor changes them at order 1."""
    rs = np.random.default_rng(0)
    x = jnp.asarray(rs.normal(size=(B, 5, D)))
    y = jnp.asarray(rs.integers(0, CLASSES, B))
    m = NnxAttention(nnx.Rngs(0))
    flat = {n: {"kernel": getattr(m.att, n).kernel[...].reshape(D, D),
                "bias": getattr(m.att, n).bias[...].reshape(D)}
            for n in ("query", "key", "value", "out")}
    flat["fc"] = _linen(m.fc)
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(Explicit.apply(flat, x)),
                               rtol=1e-6)
    _nnx_run(m, x, y)
    ref = _jax_run(Explicit, flat, x, y, layers=[grng_jax.Layer((n, "kernel"), (n, "bias"))
                                                 for n in flat], expect_layers=5)
    for n in ("query", "key", "value", "out"):
        step = np.asarray(getattr(m.att, n).kernel[...]).reshape(D, D) - flat[n]["kernel"]
        want = np.asarray(ref[n]["kernel"]) - flat[n]["kernel"]
        assert np.abs(want).max() > 1e-4
        np.testing.assert_allclose(step, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_nnx_split_merge_with_plain_optax():
    """nnx.split params (a State of Variables) with the optax transformation itself."""
    import optax

    rs = np.random.default_rng(1)
    x, y = jnp.asarray(rs.normal(size=(B, 7, 6, 2))), jnp.asarray(rs.integers(0, CLASSES, B))
    m = NnxCNN(nnx.Rngs(1))
    linen = {"params": {"Conv_0": _linen(m.conv), "Dense_0": _linen(m.fc)}}
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    tx = grng_jax.ring(0.1, **HP)
    state = tx.init(params)

    def loss_fn(p, b):
        return _ce(nnx.merge(graphdef, p, rest)(b[0]), b[1])

    for _ in range(STEPS):
        g = jax.grad(loss_fn)(params, (x, y))
        u, state = tx.update(g, state, params, loss_fn=loss_fn, batch=(x, y))
        params = optax.apply_updates(params, u)
    ref = _jax_run(FlaxCNN(), linen, x, y, expect_layers=2)["params"]
    _close(nnx.merge(graphdef, params, rest).conv.kernel[...], ref["Conv_0"]["kernel"])


def _scan_model():
    import flax.linen as fnn

    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, h, _):
            return jnp.tanh(fnn.Dense(4)(h)), None

    class Scanned(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h, _ = fnn.scan(Block, variable_broadcast=False, variable_axes={"params": 0},
                            split_rngs={"params": True}, length=2)()(x, None)
            return fnn.Dense(CLASSES)(h)

    return Scanned()


def _remat_model():
    import flax.linen as fnn

    class Remat(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(CLASSES)(jnp.tanh(fnn.remat(fnn.Dense)(4)(x)))

    return Remat()


@pytest.mark.parametrize("build, words", [(_scan_model, "nn.scan"), (_remat_model, "nn.remat")])
def test_scan_and_remat_are_refused_by_name(build, words):
    """A registered kernel called inside nn.scan / nn.remat cannot be collected: the update
    says which transformation; layers=find_layers(...) leaves it out and trains."""
    model = build()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 4)))
    y = jnp.zeros((B,), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x)

    def loss_fn(p, b):
        return _ce(model.apply(p, b[0]), b[1])

    opt = grng_jax.ring(0.1, **HP)
    state = opt.init(params)
    g = jax.grad(loss_fn)(params, (x, y))
    pattern = r"calls covered layers inside " + words.replace(".", r"\.")
    with pytest.raises(ValueError, match=pattern):
        opt.update(g, state, params, loss_fn=loss_fn, batch=(x, y))
    found = grng_jax.find_layers(loss_fn, params, (x, y))
    assert [L.weight for L in found] == [("params", "Dense_0", "kernel")]
    opt = grng_jax.ring(0.1, **HP, layers=found)
    state = opt.init(params)
    u, state = opt.update(g, state, params, loss_fn=loss_fn, batch=(x, y))
    assert len(state.core.curvature.kfac) == 1
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(u))



class _NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.lin(x))


class _NnxLifted(nnx.Module):
    """A head and blocks of the same width called inside nnx.scan (stacked with nnx.vmap, the
    scan-over-layers idiom) or each inside nnx.remat."""

    def __init__(self, mode: str, rngs):
        self.mode = mode
        self.inp = nnx.Linear(4, 4, rngs=rngs)
        if mode == "scan":
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stack(rngs):
                return _NnxBlock(rngs)
            self.blocks = stack(rngs)
        else:
            self.blocks = nnx.List([_NnxBlock(rngs) for _ in range(2)])
        self.out = nnx.Linear(4, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)
        if self.mode == "scan":
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(h, block):
                return block(h)
            x = run(x, self.blocks)
        else:
            for block in self.blocks:
                x = nnx.remat(lambda b, h: b(h))(block, x)
        return self.out(x)


@pytest.mark.parametrize("mode, words", [("scan", "nnx.scan"), ("remat", "nnx.remat")])
def test_nnx_scan_and_remat_are_named_as_the_reason(mode, words):
    """flax.nnx's hooks do not know a layer's path: a kernel called inside nnx.scan / nnx.remat
    is found by its shape (its stack's under a scan), so find_layers and the refusal say it is
    lifted (before: "not called through a tagged layer", and the refusal named only "dense");
    the head of the same width, called outside, stays K-FAC."""
    import optax

    model = _NnxLifted(mode, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 4)), jnp.float32)
    y = jnp.zeros((B,), jnp.int32)

    def loss(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean()
    params = nnx.state(model, nnx.Param)
    loss_fn = grng_jax.nnx_loss_fn(model, loss)
    found = grng_jax.find_layers(loss_fn, params, (x, y))
    assert sorted(L.weight for L in found) == [("inp", "kernel"), ("out", "kernel")]
    lifted = [p for p in found.reasons if p[-1] == "kernel"]
    assert lifted and all(p[0] == "blocks" for p in lifted), found.reasons
    assert all(found.reasons[p].startswith("its layer is called inside ") and words in
               found.reasons[p] for p in lifted), found.reasons
    tx = grng_jax.ring()
    state = tx.init(params)
    grads = nnx.grad(loss)(model, (x, y))
    with pytest.raises(ValueError, match=r"calls covered layers inside .*\(blocks/"):
        tx.update(grads, state, params, loss_fn=loss_fn, batch=(x, y))

class _NnxBatchNormDropout(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(8, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x)))))


def _nnx_train_step(model, tx, batch, grng: bool):
    """One nnx.Optimizer step as the README writes it; the model's non-parameter state
    (BatchNorm statistics, Dropout RNG counts) after it."""
    import optax

    def loss(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean()

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        kw = {"loss_fn": grng_jax.nnx_loss_fn(model, loss), "batch": batch} if grng else {}
        value, grads = nnx.value_and_grad(loss)(model, batch)
        optimizer.update(model, grads, **kw)
        return value

    return float(step(model, optimizer, batch)), nnx.state(model, nnx.Not(nnx.Param))


@pytest.mark.parametrize("algorithm", ["reng", "ring", "rkalman"])
def test_nnx_batchnorm_dropout_through_nnx_optimizer(algorithm):
    """BatchNorm and Dropout in training mode: the optimizer's own passes run on a merged copy
    (flax refuses to mutate the model's BatchStat / RngCount from them), so the step trains and
    the model's batch statistics and RNG counts move exactly as under plain optax."""
    import optax

    rs = np.random.default_rng(2)
    batch = (jnp.asarray(rs.normal(size=(B, 6)), dtype=jnp.float32),
             jnp.asarray(rs.integers(0, CLASSES, B)))
    model = _NnxBatchNormDropout(nnx.Rngs(0))
    model.train()
    before = nnx.state(model, nnx.Param)
    before = jax.tree.map(np.asarray, before)
    loss, rest = _nnx_train_step(model, getattr(grng_jax, algorithm)(), batch, grng=True)
    assert np.isfinite(loss)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                         nnx.state(model, nnx.Param), before)
    assert max(jax.tree.leaves(moved)) > 0
    plain = _NnxBatchNormDropout(nnx.Rngs(0))
    plain.train()
    _, rest_plain = _nnx_train_step(plain, optax.sgd(0.0), batch, grng=False)

    def raw(x):
        return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                          else x)

    leaves, leaves_plain = jax.tree.leaves(rest), jax.tree.leaves(rest_plain)
    assert len(leaves) == len(leaves_plain) >= 3  # mean, var, the dropout RNG count
    for a, b in zip(leaves, leaves_plain):
        np.testing.assert_array_equal(raw(a), raw(b))


def test_a_loss_of_the_model_passed_as_loss_fn_names_nnx_loss_fn():
    """nnx.Optimizer hands the update the params State: a loss written for the model,
    loss(model, batch), fails on it; the error says to wrap it (before: jax's "'State' object
    is not callable" from inside the user's loss)."""
    model = _NnxBlock(nnx.Rngs(0))
    x = jnp.ones((B, 4), jnp.float32)

    def loss(m, b):
        return jnp.mean(m(b) ** 2)
    optimizer = nnx.Optimizer(model, grng_jax.ring(), wrt=nnx.Param)
    grads = nnx.grad(loss)(model, x)
    with pytest.raises(TypeError, match=r"grng_jax.nnx_loss_fn\(model, loss\)"):
        optimizer.update(model, grads, loss_fn=loss, batch=x)
    optimizer.update(model, grads, loss_fn=grng_jax.nnx_loss_fn(model, loss), batch=x)
