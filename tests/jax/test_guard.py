"""The non-finite guard through grng_jax's optax transformations under jax.jit: a non-finite
step leaves the parameters and the core state unchanged, counts the skip, and does not
retrace."""

from __future__ import annotations

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grng_core as gc
from tests import cases

# each optimizer as its builder makes it by default (structure and estimator)
DEFAULTS = cases.defaults()


@pytest.mark.parametrize("case", DEFAULTS, ids=[c.optimizer for c in DEFAULTS])
def test_jax_adapter_skips_nonfinite_under_jit(case):
    def loss_fn(params, batch):
        x, y = batch
        h = jnp.tanh(grng_jax.dense(x, params[0]["kernel"], params[0]["bias"]))
        logits = grng_jax.dense(h, params[1]["kernel"], params[1]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    k1, k2 = jax.random.split(jax.random.key(0))
    params = [grng_jax.init_dense(k1, 4, 6), grng_jax.init_dense(k2, 6, 3)]
    opt = case.jax(0.1, ns_max_iter=8)
    state = opt.init(params)
    x = jax.random.normal(jax.random.key(1), (8, 4), dtype=params[0]["kernel"].dtype)
    y = jnp.arange(8) % 3

    @jax.jit
    def step(p, s, x):
        g = jax.grad(loss_fn)(p, (x, y))
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=(x, y))
        return optax.apply_updates(p, u), s

    params, state = step(params, state, x)
    before_p = jax.tree.map(np.asarray, params)
    before_s = jax.tree.map(np.asarray, gc.codec.encode(state.core))
    p2, s2 = step(params, state, x.at[0, 0].set(jnp.nan))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, p2), before_p)
    assert int(s2.core.skipped) == int(before_s["skipped"]) + 1
    rest = {k: v for k, v in gc.codec.encode(s2.core).items() if k != "skipped"}
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rest),
                 {k: v for k, v in before_s.items() if k != "skipped"})
    assert step._cache_size() == 1


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_an_eager_update_reports_a_nonfinite_step_at_once(on_nonfinite):
    """Outside jit the default refresh="switch" ran the core inside lax.switch, where it saw
    traced values: a NaN batch was skipped silently and "raise" did not raise. The branch is
    now picked on the host: it warns (or raises), parameters and state unchanged."""
    def loss_fn(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(
            grng_jax.dense(x, params["kernel"], params["bias"]), y).mean()

    params = grng_jax.init_dense(jax.random.key(0), 4, 3)
    x = jax.random.normal(jax.random.key(1), (8, 4)).at[2, 1].set(jnp.nan)
    y = jnp.arange(8) % 3
    opt = grng_jax.ring(on_nonfinite=on_nonfinite)
    state = opt.init(params)
    g = jax.grad(loss_fn)(params, (x, y))
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.update(g, state, params, loss_fn=loss_fn, batch=(x, y))
        return
    with pytest.warns(RuntimeWarning, match="skipped"):
        u, new = opt.update(g, state, params, loss_fn=loss_fn, batch=(x, y))
    assert int(new.core.skipped) == 1
    jax.tree.map(lambda a: np.testing.assert_array_equal(np.asarray(a), 0.0), u)


def test_a_batch_of_mixed_leading_sizes_is_named_before_the_loss_runs():
    """(x of 8 rows, y of 4): the adapter's message, not a broadcasting error from inside the
    user's loss (the layer trace ran the loss first)."""
    def loss_fn(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(
            grng_jax.dense(x, params["kernel"], params["bias"]), y).mean()

    params = grng_jax.init_dense(jax.random.key(0), 4, 3)
    x, y = jax.random.normal(jax.random.key(1), (8, 4)), jnp.arange(8) % 3
    opt = grng_jax.ring()
    g = jax.grad(loss_fn)(params, (x, y))
    with pytest.raises(ValueError, match="same leading batch axis"):
        opt.update(g, opt.init(params), params, loss_fn=loss_fn, batch=(x, y[:4]))
