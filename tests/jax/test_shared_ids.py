"""Token ids of one example's shape with T = B (grng_jax._shared_ids): a position embedding of
`arange(T)` is told from per-example ids by a trace with one more example; where the loss
cannot take one, the adapter warns and the layer stays on K-FAC (grng_torch's behaviour)."""

from __future__ import annotations

import warnings

import flax.linen as fnn
import grng_jax
import jax
import jax.numpy as jnp
import optax
import pytest

T = 5  # = the batch size: the ids' shapes alone cannot tell


class PositionsAndUsers(fnn.Module):
    """Tokens (B, T) with positions arange(T) (shared) and a user id per example (B,)."""

    @fnn.compact
    def __call__(self, ids, users):
        h = fnn.Embed(10, 4, name="tok")(ids) + fnn.Embed(T, 4, name="pos")(jnp.arange(T))
        h = h.mean(1) + fnn.Embed(7, 4, name="user")(users)
        return fnn.Dense(3, name="head")(jnp.tanh(h))


def _problem(fixed_batch: bool = False):
    model = PositionsAndUsers()
    ids = jax.random.randint(jax.random.PRNGKey(0), (T, T), 0, 10)
    users = jax.random.randint(jax.random.PRNGKey(1), (T,), 0, 7)
    y = jnp.arange(T) % 3
    params = model.init(jax.random.PRNGKey(2), ids, users)["params"]

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b[0], b[1])
        if fixed_batch:  # a model with the batch size written into it
            logits = jnp.reshape(logits, (T, 3))
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[2]).mean()

    return params, (ids, users, y), loss_fn


def test_positions_are_shared_and_user_ids_are_per_example():
    params, batch, loss_fn = _problem()
    found = grng_jax.find_layers(loss_fn, params, batch)
    assert {L.weight[0] for L in found} == {"tok", "user", "head"}
    assert found.reasons == {("pos", "embedding"): (
        "called on an input of shape (5,) shared by a batch of 5 examples (its output is "
        "broadcast over them, so its output gradient is summed over the examples: no "
        "per-example K-FAC rows)")}
    opt = grng_jax.ring()  # layers="auto" registers pos by name: the update refuses it
    with pytest.raises(ValueError, match=r"'pos/embedding'.*shared by a batch of 5.*find_layers"):
        opt.update(jax.grad(loss_fn)(params, batch), opt.init(params), params,
                   loss_fn=loss_fn, batch=batch)
    opt = grng_jax.ring(layers=found)
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss_fn)(p, batch), s, p,
                                           loss_fn=loss_fn, batch=batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, state = step(params, state)
    assert int(state.core.skipped) == 0


def test_a_loss_that_cannot_take_one_more_example_warns_and_keeps_the_layer():
    params, batch, loss_fn = _problem(fixed_batch=True)
    with pytest.warns(UserWarning, match=r"embedding 'pos/embedding' is called on ids of shape "
                                         r"\(5,\).*could not be traced on one more example"):
        found = grng_jax.find_layers(loss_fn, params, batch)
    assert {L.weight[0] for L in found} == {"tok", "pos", "user", "head"}
