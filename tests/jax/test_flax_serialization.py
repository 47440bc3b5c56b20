"""flax.serialization (to_bytes / from_bytes of a flax TrainState, the usual flax.linen
checkpoint) saves and restores a grng_jax state with K-FAC layers: the restored run's next step
is bit-identical to the uninterrupted one; a template built for another model is refused."""

import flax.linen as nn
import grng_jax
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import serialization
from flax.training import train_state


class _MLP(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(self.width)(x)))


def _setup(width=8):
    model = _MLP(width)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 5))
    y = jnp.arange(16) % 3
    params = model.init(jax.random.PRNGKey(0), x)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, batch[0]),
                                                               batch[1]).mean()

    opt = grng_jax.ring()

    @jax.jit
    def step(ts):
        g = jax.grad(loss_fn)(ts.params, (x, y))
        u, s = ts.tx.update(g, ts.opt_state, ts.params, loss_fn=loss_fn, batch=(x, y))
        return ts.replace(params=optax.apply_updates(ts.params, u), opt_state=s,
                          step=ts.step + 1)

    def fresh():
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=opt)
    return fresh, step


def test_to_bytes_round_trip_continues_bit_identically():
    fresh, step = _setup()
    ts = fresh()
    for _ in range(3):
        ts = step(ts)
    restored = serialization.from_bytes(fresh(), serialization.to_bytes(ts))
    for _ in range(22):  # through the warm-up's end and a scheduled refresh
        ts, restored = step(ts), step(restored)
    for a, b in zip(jax.tree_util.tree_leaves(ts), jax.tree_util.tree_leaves(restored)):
        assert jnp.array_equal(a, b)


def test_a_template_of_another_model_is_refused():
    fresh, step = _setup()
    blob = serialization.to_bytes(step(fresh()))
    other, _ = _setup(width=6)
    with pytest.raises(ValueError, match="K-FAC layer .* is not the template's"):
        serialization.from_bytes(other(), blob)
