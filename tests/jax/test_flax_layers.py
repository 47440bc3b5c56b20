"""flax.linen layers beyond Dense get K-FAC through the interceptor (no model change): Conv
(unfolded patches), Embed (token ids, A diagonal) and DenseGeneral (here the projections of
MultiHeadDotProductAttention, kernels (d, heads, head_dim) and (heads, head_dim, d)).
References: the torch adapter on the same model (Conv2d, Embedding: their K-FAC rows are
checked against dense loops in tests/torch/test_layers.py) and, for attention, the same
attention written with 2-D kernels through grng_jax.dense; steps equal to 1e-9 in float64."""

from __future__ import annotations

import flax.linen as fnn
import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
B, CLASSES, STEPS = 6, 3, 3
HP = dict(damping=1e-2)


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def f64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), tree)


def _jax_run(model, params, x, y, lr=0.1, expect_layers=None, **kw):
    opt = grng_jax.ring(lr, **HP, **kw)
    state = opt.init(params)

    def loss_fn(p, batch):
        return _ce(model.apply(p, batch[0]), batch[1])

    for _ in range(STEPS):
        grads = jax.grad(loss_fn)(params, (x, y))
        updates, state = opt.update(grads, state, params, loss_fn=loss_fn, batch=(x, y))
        params = optax.apply_updates(params, updates)
    assert len(state.core.curvature.kfac) == expect_layers
    return params


def _torch_run(model, x, y, lr=0.1, **kw):
    import grng_torch

    opt = grng_torch.RING(model.parameters(), model=model, lr=lr, **HP, **kw)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(STEPS):
        opt.step(closure)
    return opt


class FlaxCNN(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = fnn.Conv(3, (3, 3), strides=2, padding=1)(x)
        return fnn.Dense(CLASSES)(jnp.tanh(h).mean((1, 2)))


class TorchCNN(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(2, 3, 3, stride=2, padding=1).double()
        self.fc = tnn.Linear(3, CLASSES).double()

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("form", ["adaptive_damping", "gauss_newton"])
def test_conv_steps_equal_the_torch_adapter(form):
    rs = np.random.default_rng(0)
    x = rs.normal(size=(B, 7, 6, 2))
    y = rs.integers(0, CLASSES, B)
    params = f64(FlaxCNN().init(jax.random.PRNGKey(0), jnp.asarray(x)))
    p = params["params"]
    tm = TorchCNN()
    with torch.no_grad():
        tm.conv.weight.copy_(torch.tensor(np.asarray(p["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)))
        tm.conv.bias.copy_(torch.tensor(np.asarray(p["Conv_0"]["bias"])))
        tm.fc.weight.copy_(torch.tensor(np.asarray(p["Dense_0"]["kernel"]).T))
        tm.fc.bias.copy_(torch.tensor(np.asarray(p["Dense_0"]["bias"])))
    out = _jax_run(FlaxCNN(), params, jnp.asarray(x), jnp.asarray(y), form=form, expect_layers=2)
    _torch_run(tm, torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(y), form=form)
    k = np.asarray(out["params"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)
    np.testing.assert_allclose(k, tm.conv.weight.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert np.abs(k - np.asarray(p["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)).max() > 1e-3


class FlaxEmbed(fnn.Module):
    @fnn.compact
    def __call__(self, ids):
        return fnn.Dense(CLASSES)(jnp.tanh(fnn.Embed(10, 4)(ids)).mean(1))


class TorchEmbed(tnn.Module):
    def __init__(self):
        super().__init__()
        self.emb = tnn.Embedding(10, 4).double()
        self.fc = tnn.Linear(4, CLASSES).double()

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


def test_embed_steps_equal_the_torch_adapter():
    rs = np.random.default_rng(0)
    ids = rs.integers(0, 8, size=(B, 5))
    y = rs.integers(0, CLASSES, B)
    params = f64(FlaxEmbed().init(jax.random.PRNGKey(0), jnp.asarray(ids)))
    p = params["params"]
    tm = TorchEmbed()
    with torch.no_grad():
        tm.emb.weight.copy_(torch.tensor(np.asarray(p["Embed_0"]["embedding"])))
        tm.fc.weight.copy_(torch.tensor(np.asarray(p["Dense_0"]["kernel"]).T))
        tm.fc.bias.copy_(torch.tensor(np.asarray(p["Dense_0"]["bias"])))
    out = _jax_run(FlaxEmbed(), params, jnp.asarray(ids), jnp.asarray(y), expect_layers=2)
    _torch_run(tm, torch.tensor(ids), torch.tensor(y))
    e = np.asarray(out["params"]["Embed_0"]["embedding"])
    np.testing.assert_allclose(e, tm.emb.weight.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(e[8:], np.asarray(p["Embed_0"]["embedding"])[8:])


class FlaxPositions(fnn.Module):
    """Token embedding plus a position embedding of ids (1, T) (`row`) or (T,), broadcast over
    the batch."""

    row: bool = True

    @fnn.compact
    def __call__(self, ids):
        pos_ids = jnp.arange(ids.shape[1])
        pos = fnn.Embed(5, 4, name="pos")(pos_ids[None] if self.row else pos_ids)
        return fnn.Dense(CLASSES)(jnp.tanh(fnn.Embed(10, 4, name="tok")(ids) + pos).mean(1))


class TorchPositions(tnn.Module):
    def __init__(self, row: bool = True):
        super().__init__()
        self.row = row
        self.tok, self.pos = tnn.Embedding(10, 4).double(), tnn.Embedding(5, 4).double()
        self.fc = tnn.Linear(4, CLASSES).double()

    def forward(self, ids):
        pos_ids = torch.arange(ids.shape[1])
        pos = self.pos(pos_ids[None] if self.row else pos_ids)
        return self.fc(torch.tanh(self.tok(ids) + pos).mean(1))


@pytest.mark.parametrize("row", [True, False])
def test_a_position_embedding_shared_by_the_batch_stays_on_the_diagonal(row):
    """Its output gradient is summed over the examples (no per-example K-FAC rows, §2.1):
    layers="auto" refuses it by name at the first update; find_layers leaves it out, and the
    steps equal the torch adapter's, which puts it on the diagonal itself."""
    rs = np.random.default_rng(0)
    ids, y = rs.integers(0, 10, size=(B, 5)), rs.integers(0, CLASSES, B)
    params = f64(FlaxPositions(row).init(jax.random.PRNGKey(0), jnp.asarray(ids)))
    batch = (jnp.asarray(ids), jnp.asarray(y))

    def loss_fn(p, b):
        return _ce(FlaxPositions(row).apply(p, b[0]), b[1])

    opt = grng_jax.ring(0.1, **HP)
    with pytest.raises(ValueError, match=r"'params/pos/embedding'.*shared by a batch of 6"):
        opt.update(jax.grad(loss_fn)(params, batch), opt.init(params), params,
                   loss_fn=loss_fn, batch=batch)
    layers = grng_jax.find_layers(loss_fn, params, batch)
    assert sorted("/".join(L.weight) for L in layers) == ["params/Dense_0/kernel",
                                                          "params/tok/embedding"]
    out = _jax_run(FlaxPositions(row), params, *batch, layers=layers, expect_layers=2)
    p = params["params"]
    tm = TorchPositions(row)
    with torch.no_grad():
        for name in ("tok", "pos"):
            getattr(tm, name).weight.copy_(torch.tensor(np.asarray(p[name]["embedding"])))
        tm.fc.weight.copy_(torch.tensor(np.asarray(p["Dense_0"]["kernel"]).T))
        tm.fc.bias.copy_(torch.tensor(np.asarray(p["Dense_0"]["bias"])))
    opt_t = _torch_run(tm, torch.tensor(ids), torch.tensor(y))
    assert [e.structure for e in opt_t.describe().entries if e.name == "pos.weight"] == \
        ["diagonal"]
    for name in ("tok", "pos"):
        np.testing.assert_allclose(np.asarray(out["params"][name]["embedding"]),
                                   getattr(tm, name).weight.detach().numpy(), rtol=1e-9,
                                   atol=1e-12)


D, H = 8, 2


class FlaxAttention(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = fnn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, out_features=D)(x)
        return fnn.Dense(CLASSES)(h.mean(1))


def _explicit(p, x):
    """The same attention with 2-D kernels through grng_jax.dense."""
    def proj(name):
        q = grng_jax.dense(x, p[name]["kernel"], p[name]["bias"])
        return q.reshape(*q.shape[:-1], H, D // H)

    q, k, v = proj("query"), proj("key"), proj("value")
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(D // H), k), -1)
    att = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(*x.shape[:-1], D)
    h = grng_jax.dense(att, p["out"]["kernel"], p["out"]["bias"])
    return grng_jax.dense(h.mean(1), p["fc"]["kernel"], p["fc"]["bias"])


class Explicit:
    @staticmethod
    def apply(params, x):
        return _explicit(params, x)


def test_attention_projections_equal_two_dimensional_kernels():
    rs = np.random.default_rng(0)
    x = jnp.asarray(rs.normal(size=(B, 5, D)))
    y = jnp.asarray(rs.integers(0, CLASSES, B))
    params = f64(FlaxAttention().init(jax.random.PRNGKey(0), x))
    a = params["params"]["MultiHeadDotProductAttention_0"]
    flat = {n: {"kernel": a[n]["kernel"].reshape(D, D), "bias": a[n]["bias"].reshape(D)}
            for n in ("query", "key", "value", "out")}
    flat["fc"] = dict(params["params"]["Dense_0"])
    np.testing.assert_allclose(np.asarray(FlaxAttention().apply(params, x)),
                               np.asarray(_explicit(flat, x)), rtol=1e-12)
    out = _jax_run(FlaxAttention(), params, x, y, expect_layers=5)
    ref = _jax_run(Explicit, flat, x, y, layers=[grng_jax.Layer((n, "kernel"), (n, "bias"))
                                                 for n in flat], expect_layers=5)
    got = out["params"]["MultiHeadDotProductAttention_0"]
    for n in ("query", "key", "value", "out"):
        np.testing.assert_allclose(np.asarray(got[n]["kernel"]).reshape(D, D),
                                   np.asarray(ref[n]["kernel"]), rtol=1e-9, atol=1e-12)
    moved = np.asarray(got["query"]["kernel"]) - np.asarray(a["query"]["kernel"])
    assert np.abs(moved).max() > 1e-4


def test_find_layers_leaves_a_tied_embedding_to_the_diagonal():
    """A flax Embed whose table also gives the logits (`attend`, weight tying): `layers="auto"`
    refuses it naming find_layers, and find_layers kept it, so its advice failed the same
    way. It now leaves the table out (K-FAC cannot see the `attend` use); the step trains."""
    V, D, T, B = 11, 8, 5, 6

    class LM(fnn.Module):
        @fnn.compact
        def __call__(self, ids):
            emb = fnn.Embed(V, D)
            h = fnn.relu(fnn.Dense(D, use_bias=False)(emb(ids)))
            return emb.attend(h)

    model = LM()
    ids = jax.random.randint(jax.random.key(0), (B, T), 0, V)
    batch = (ids, jnp.roll(ids, -1, 1))
    params = model.init(jax.random.key(1), ids)

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]), b[1]).mean()

    g = jax.grad(loss_fn)(params, batch)
    auto = grng_jax.ring()
    with pytest.raises(ValueError,
                       match=r"also used by Embed.attend \(a tied weight\).*find_layers"):
        auto.update(g, auto.init(params), params, loss_fn=loss_fn, batch=batch)
    layers = grng_jax.find_layers(loss_fn, params, batch)
    assert [layer.weight for layer in layers] == [("params", "Dense_0", "kernel")]
    opt = grng_jax.ring(layers=layers)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(p, u), s, value

    losses = []
    for _ in range(15):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0] and int(state.core.skipped) == 0
