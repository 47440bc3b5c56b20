"""flax.linen models as users write them, on scikit-learn's digits and CPython's own text: a CNN
(Conv, Dense) and a character transformer (Embed, MultiHeadDotProductAttention, LayerNorm,
Dense). Used by tests/jax/test_zoo_flax.py."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.mean((1, 2)))


class CharTransformer(nn.Module):
    vocab: int = 48
    d: int = 32
    T: int = 16

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, self.d)(ids)
        h = h + self.param("pos", nn.initializers.normal(0.02), (self.T, self.d))
        mask = nn.make_causal_mask(ids)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(h), mask=mask)
        h = h + nn.Dense(self.d)(nn.gelu(nn.Dense(2 * self.d)(nn.LayerNorm()(h))))
        return nn.Dense(self.vocab)(nn.LayerNorm()(h))


def digits_batches(B: int = 64):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = jnp.asarray(d.data.reshape(-1, 8, 8, 1) / 16.0, jnp.float32)
    y = jnp.asarray(d.target, jnp.int32)

    def batch(k):
        idx = np.random.default_rng(k).integers(0, len(y), B)
        return x[idx], y[idx]

    return batch, (x, y)


def text_batches(vocab: int = 48, B: int = 16, T: int = 16):
    tokens = np.array([ord(c) % vocab for c in inspect.getsource(inspect)[:20000]])

    def batch(k):
        starts = np.random.default_rng(k).integers(0, len(tokens) - T - 1, B)
        x = np.stack([tokens[s:s + T] for s in starts])
        y = np.stack([tokens[s + 1:s + T + 1] for s in starts])
        return jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)

    return batch


def init(model, example, seed=0):
    return model.init(jax.random.PRNGKey(seed), example)
