"""grng_jax.describe: every params leaf by path with its structure, K-FAC layer or the reason
it is diagonal; a one-time warning at init when most weight matrices would be diagonal."""

from __future__ import annotations

import warnings

import flax.linen as fnn
import grng_jax
import jax
import jax.numpy as jnp
import optax
import pytest


class CNN(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = fnn.Conv(4, (3, 3))(x)
        return fnn.Dense(3)(h.mean((1, 2)))


def test_describe_names_layers_and_works_inside_a_chain():
    params = CNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))
    opt = optax.chain(optax.clip_by_global_norm(1.0), grng_jax.ring(0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = opt.init(params)
    report = grng_jax.describe(opt, state, params)
    by = {e.name: e for e in report.entries}
    assert by["params/Conv_0/kernel"].layer == "params/Conv_0"
    assert by["params/Dense_0/bias"].structure == "kfac"
    assert report.kfac_share == 1.0 and report.skipped == 0


def test_equinox_style_weights_are_layers_with_a_bias_and_reported_without():
    """'weight' (out, in) with a 'bias' of its first axis: an equinox layer, registered output
    axis first; without a bias (a bias-less layer or an embedding) it is not, with the reason."""
    with_bias = {"layers": [{"weight": jnp.zeros((8, 4)), "bias": jnp.zeros(8)},
                            {"weight": jnp.zeros((3, 8)), "bias": jnp.zeros(3)}]}
    state = grng_jax.ring(0.1).init(with_bias)
    assert [L.layout.transposed for L in state.core.curvature.kfac] == [False, False]
    assert [(L.layout.d_out, L.layout.d_in) for L in state.core.curvature.kfac] == [(8, 4),
                                                                                    (3, 8)]
    params = {"layers": [{"weight": jnp.zeros((8, 4))}, {"weight": jnp.zeros((3, 8))}]}
    opt = grng_jax.ring(0.1)
    with pytest.warns(UserWarning, match=r"2 of 2 weight matrices.*named 'weight' without"):
        state = opt.init(params)
    report = grng_jax.describe(opt, state, params)
    assert report.kfac_share == 0.0
    assert all("find_layers" in e.reason for e in report.matrices())
    assert all("eqx.nn.Embedding table stays diagonal" in e.reason for e in report.matrices())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grng_jax.ring(0.1, structure="diagonal").init(params)  # chosen: no warning


def test_a_step_skipped_under_jit_warns_and_advances_the_schedule():
    """Under jit the skip is reported through jax.debug.callback, and the refresh schedule
    counts calls: a batch that keeps failing on a refresh step does not refresh every call."""
    params = {"l": grng_jax.init_dense(jax.random.PRNGKey(0), 3, 2, dtype=jnp.float64)}

    def loss_fn(p, batch):
        out = grng_jax.dense(batch[0], p["l"]["kernel"], p["l"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(out, batch[1]).mean()

    opt = grng_jax.ring(0.1, curvature_every=3, inverse_every=3, refresh_warmup=0)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        return opt.update(grads, state, params, loss_fn=loss_fn, batch=batch)

    bad = (jnp.full((4, 3), jnp.nan), jnp.zeros(4, jnp.int32))
    with pytest.warns(RuntimeWarning, match="skipped"):
        _, state = step(params, state, bad)
        jax.effects_barrier()
    assert int(state.core.skipped) == 1 and int(state.core.step) == 0
    good = (jnp.ones((4, 3)), jnp.zeros(4, jnp.int32))
    _, state = step(params, state, good)  # call 2 of a 3-call period: no refresh
    assert int(state.core.step) == 1 and int(state.core.curvature_count) == 0


def test_inside_multi_transform_describe_names_the_leaves_it_owns():
    """A GRNG optimizer on Dense_1 only (AdamW on Dense_0): with the whole params, describe
    named Dense_0 as its K-FAC layer (the state's leaves read against the wrong tree); it now
    refuses them naming the fix, and with the masked params names Dense_1."""
    class MLP(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3)(jnp.tanh(fnn.Dense(12)(x)))

    model = MLP()
    x, y = jax.random.normal(jax.random.key(0), (16, 6)), jnp.arange(16) % 3
    params = model.init(jax.random.key(1), x)
    labels = {"params": {"Dense_0": {"kernel": "a", "bias": "a"},
                         "Dense_1": {"kernel": "g", "bias": "g"}}}
    opt = optax.multi_transform({"g": grng_jax.ring(), "a": optax.adamw(1e-3)}, labels)

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]), b[1]).mean()

    state = opt.init(params)
    g = jax.grad(loss_fn)(params, (x, y))
    _, state = opt.update(g, state, params, loss_fn=loss_fn, batch=(x, y), full_params=params)
    with pytest.raises(ValueError, match="covers 2 leaves, params has 4"):
        grng_jax.describe(opt, state, params)
    mine = jax.tree.map(lambda p, lab: p if lab == "g" else optax.MaskedNode(), params, labels)
    text = str(grng_jax.describe(opt, state, mine))
    assert "layer params/Dense_1" in text and "Dense_0" not in text


def test_a_non_float_leaf_is_refused_at_init_naming_its_path_and_the_equinox_filter():
    """eqx.partition(model, eqx.is_array) keeps a model's integer buffers (position ids) in the
    params; the core alone would name the leaf by its position."""
    params = {"block": {"weight": jnp.zeros((3, 4)), "bias": jnp.zeros(3),
                        "pos_ids": jnp.arange(5)}}
    with pytest.raises(TypeError, match=r"params leaf 'block/pos_ids' has dtype int(32|64).*"
                                        r"eqx\.is_inexact_array"):
        grng_jax.ring().init(params)


def test_flattened_params_warn_that_no_layer_can_take_kfac():
    """optax.flatten(ring()) hands the optimizer one vector: K-FAC has no layer, every leaf
    runs the fallback; before, nothing said so (no weight matrix, so no mostly-diagonal
    warning). The model's own pytree does not warn."""
    params = {"l1": grng_jax.init_dense(jax.random.PRNGKey(0), 40, 30),
              "l2": grng_jax.init_dense(jax.random.PRNGKey(1), 30, 3)}
    with pytest.warns(UserWarning, match="no weight matrix.*optax.flatten"):
        optax.flatten(grng_jax.ring()).init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grng_jax.ring().init(params)


def test_find_layers_says_why_a_matrix_is_not_among_its_layers():
    """With layers=grng_jax.find_layers(...), a weight used by a hand-written matmul and a tied
    embedding's table read find_layers' reason, not "not in the layers= given"."""
    class Tied(fnn.Module):
        @fnn.compact
        def __call__(self, ids):
            emb = fnn.Embed(20, 8)
            h = jnp.tanh(emb(ids) @ self.param("mix", fnn.initializers.lecun_normal(), (8, 8)))
            return emb.attend(fnn.Dense(8)(h))

    ids = jnp.arange(12).reshape(3, 4) % 20
    params = Tied().init(jax.random.PRNGKey(0), ids)["params"]

    def loss_fn(p, batch):
        logits = Tied().apply({"params": p}, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch).mean()
    found = grng_jax.find_layers(loss_fn, params, ids)
    assert [L.weight for L in found] == [("Dense_0", "kernel")]
    opt = grng_jax.ring(layers=found)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = opt.init(params)
    why = {e.name: e.reason for e in grng_jax.describe(opt, state, params).entries}
    assert why["mix"].startswith("not called through a tagged layer"), why
    assert "also used by" in why["Embed_0/embedding"] and "attend" in why["Embed_0/embedding"]


def test_find_layers_names_a_grouped_conv_and_keeps_attention_biases():
    """A depthwise Conv's reason is its configuration (not "not called through a tagged
    layer"); the 2-D (heads, head_dim) biases of attention projections are K-FAC biases of
    their layers, not matrices left out."""
    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.Conv(6, (3,), feature_group_count=6)(x)
            return fnn.MultiHeadDotProductAttention(num_heads=2)(h, h).mean((1, 2))

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 6))
    params = Block().init(jax.random.PRNGKey(1), x)["params"]

    def loss_fn(p, batch):
        return jnp.mean(Block().apply({"params": p}, batch) ** 2)
    found = grng_jax.find_layers(loss_fn, params, x)
    attention = "MultiHeadDotProductAttention_0"
    assert {L.weight for L in found} == {(attention, k, "kernel")
                                         for k in ("query", "key", "value", "out")}
    assert set(found.reasons) == {("Conv_0", "kernel")}, found.reasons
    assert found.reasons[("Conv_0", "kernel")] == (
        "called as flax.linen Conv with feature_group_count=6 (grouped or depthwise), a "
        "configuration K-FAC does not cover")


def test_find_layers_says_a_layer_inside_nn_scan_or_remat_is_lifted():
    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, c, _):
            return jnp.tanh(fnn.Dense(6)(c)), None

    class Model(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h, _ = fnn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=2)()(fnn.Dense(6)(x), None)
            return fnn.Dense(3)(fnn.remat(fnn.Dense)(6)(h))

    x, y = jnp.ones((4, 5)), jnp.arange(4) % 3
    params = Model().init(jax.random.PRNGKey(0), x)["params"]

    def loss_fn(p, b):
        logits = Model().apply({"params": p}, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()
    found = grng_jax.find_layers(loss_fn, params, (x, y))
    assert {L.weight[0] for L in found} == {"Dense_0", "Dense_1"}
    why = found.reasons
    # the scanned bias, (2, 6), is a stack of vectors: no weight matrix (neither listed nor
    # counted by the warning; before, "4 of 6 weight matrices" named it)
    assert set(why) == {("ScanBlock_0", "Dense_0", "kernel"),
                        ("CheckpointDense_0", "kernel")}, why
    assert why[("ScanBlock_0", "Dense_0", "kernel")].startswith(
        "its layer is called inside nn.scan, which lifts")
    assert why[("CheckpointDense_0", "kernel")].startswith("its layer is called inside nn.remat")
    with pytest.warns(UserWarning, match="2 of 4 weight matrices") as seen:
        grng_jax.ring(layers=found).init(params)
    assert not any("bias" in str(w.message) for w in seen)


class Scaled(fnn.Module):
    """A Dense block under a fixed output scale of 1e-6, beside a plain head."""

    @fnn.compact
    def __call__(self, x):
        return fnn.Dense(3, name="head")(x + 1e-6 * jnp.tanh(fnn.Dense(5, name="block")(x)))


def test_a_damping_dominated_layer_is_noted():
    """The same note as grng_torch's (`grng_core.describe.damping_notes`): the block's
    curvature is far below the damping, the head's is not."""
    model = Scaled()
    x, y = jax.random.normal(jax.random.PRNGKey(0), (32, 5)), jnp.arange(32) % 3
    params = model.init(jax.random.PRNGKey(1), x)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, batch[0]),
                                                               batch[1]).mean()
    opt = grng_jax.ring()
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(jax.grad(loss_fn)(params, (x, y)), state, params,
                                    loss_fn=loss_fn, batch=(x, y))
        params = optax.apply_updates(params, updates)
    by = {e.name: e for e in grng_jax.describe(opt, state, params).entries}
    assert by["params/block/kernel"].reason.startswith("damping-dominated")
    assert by["params/block/bias"].reason == by["params/block/kernel"].reason
    assert by["params/head/kernel"].reason is None


def test_a_reason_shared_by_several_leaves_is_given_once():
    """Four bias-less 'weight' matrices (equinox attention projections): the init warning names
    them together with their reason once, and describe numbers the reason, printed once below."""
    params = {"att": {k: {"weight": jnp.zeros((16, 16))} for k in ("q", "k", "v", "o")},
              "out": {"weight": jnp.zeros((4, 16)), "bias": jnp.zeros(4)}}
    opt = grng_jax.ring()
    with pytest.warns(UserWarning, match="4 of 5 weight matrices") as caught:
        state = opt.init(params)
    text = str(caught[0].message)
    assert "att/k/weight, att/o/weight, att/q/weight, att/v/weight (named 'weight' without" in text
    assert text.count("without a 'bias'") == 1
    shown = str(grng_jax.describe(opt, state, params))
    assert shown.count("without a 'bias'") == 1
    rows = [line for line in shown.splitlines() if line.strip().startswith("att/")]
    assert len(rows) == 4 and all(line.rstrip().endswith("[1]") for line in rows)
    assert shown.splitlines()[-1].startswith("  [1] named 'weight' without a 'bias'")
