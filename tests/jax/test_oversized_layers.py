"""grng_jax: a layer whose K-FAC factor exceeds `max_factor_dim` (ALGORITHMS.md §2.1) is left
out of the K-FAC layers at init, from shapes alone (alike under jit): the same steps as the
explicit `layers=` list without it, named in `describe` and in one warning at init."""

import warnings

import grng_jax
import jax
import jax.numpy as jnp
import optax
import pytest

ALGOS = ["ring", "reng", "rkalman"]


def _setup():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"hid": {"kernel": 0.5 * jax.random.normal(k1, (6, 8)), "bias": jnp.zeros(8)},
              "head": {"kernel": 0.5 * jax.random.normal(k2, (8, 20)), "bias": jnp.zeros(20)}}
    x = jax.random.normal(k3, (32, 6))
    y = jnp.arange(32) % 20

    def loss_fn(p, batch):
        xb, yb = batch
        h = jnp.tanh(grng_jax.dense(xb, p["hid"]["kernel"], p["hid"]["bias"]))
        logits = grng_jax.dense(h, p["head"]["kernel"], p["head"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return params, (x, y), loss_fn


def _train(opt, steps=25):
    params, batch, loss_fn = _setup()
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p, batch)
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(p, u), s
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("algo", ALGOS)
def test_steps_equal_the_layers_list_without_the_oversized_head(algo):
    build = getattr(grng_jax, algo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        limited, _ = _train(build(max_factor_dim=16))
        listed, _ = _train(build(layers=[grng_jax.Layer("hid/kernel", "hid/bias")]))
        full, _ = _train(build())
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), limited, listed)
    assert max(jax.tree_util.tree_leaves(diff)) < 1e-5  # float32
    far = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), limited, full)
    assert max(jax.tree_util.tree_leaves(far)) > 1e-3  # the limit changed the structure


def test_describe_and_the_init_warning_name_the_layer():
    opt = grng_jax.ring(max_factor_dim=16)
    params, _, _ = _setup()
    with pytest.warns(UserWarning, match=r"head/kernel: its K-FAC factor S 20x20 exceeds "
                                         r"max_factor_dim=16"):
        state = opt.init(params)
    entries = {e.name: e for e in grng_jax.describe(opt, state, params).entries}
    for leaf in ("head/kernel", "head/bias"):
        assert entries[leaf].structure == "diagonal"
        assert "exceeds max_factor_dim=16" in entries[leaf].reason
    assert entries["hid/kernel"].structure == "kfac"


def test_a_state_built_without_a_limit_keeps_its_layers_under_one():
    """update takes the K-FAC layers from the state (a checkpoint built under another limit):
    the head stays on K-FAC and its statistics match."""
    params, batch, loss_fn = _setup()
    state = grng_jax.ring(max_factor_dim=None).init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = grng_jax.ring(max_factor_dim=16)
    g = jax.grad(loss_fn)(params, batch)
    _, state = low.update(g, state, params, loss_fn=loss_fn, batch=batch)
    assert len(state.core.curvature.kfac) == 2 and int(state.core.skipped) == 0


def test_describe_names_the_reason_when_no_layer_is_left():
    params = {"head": {"kernel": jnp.zeros((8, 20)), "bias": jnp.zeros(20)}}
    opt = grng_jax.ring(max_factor_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = opt.init(params)
    entries = {e.name: e for e in grng_jax.describe(opt, state, params).entries}
    for leaf in ("head/kernel", "head/bias"):
        assert "exceeds max_factor_dim=16" in entries[leaf].reason
