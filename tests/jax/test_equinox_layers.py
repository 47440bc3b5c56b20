"""equinox layers get K-FAC through hooks on their call methods (no model change): nn.Linear
and nn.Conv2d, weights stored (out, in...) and called one example at a time under jax.vmap
(nested vmaps too). Reference: the same network as a flax.linen model with the weights
transposed (whose Conv / Dense steps equal the torch adapter's, tests/jax/test_flax_layers.py);
3 RING steps in float64 agree to 1e-9. A layer registered with the wrong orientation is
refused (a square kernel passes every shape check)."""

from __future__ import annotations

import flax.linen as fnn
import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.jax.test_flax_layers import CLASSES, HP, STEPS, B, FlaxCNN, _ce, _jax_run

eqx = pytest.importorskip("equinox")
KEY = jax.random.PRNGKey(0)


class EqxCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=jnp.float64, key=k1)
        self.fc = eqx.nn.Linear(3, CLASSES, dtype=jnp.float64, key=k2)

    def __call__(self, x):  # one example, channels first
        return self.fc(jnp.tanh(self.conv(x)).mean((1, 2)))


def _eqx_run(model, x, y, lr=0.1, layers="auto", per_example=True):
    params, static = eqx.partition(model, eqx.is_array)

    def loss_fn(p, b):
        m = eqx.combine(p, static)
        return _ce(jax.vmap(m)(b[0]) if per_example else m(b[0]), b[1])

    opt = grng_jax.ring(lr, **HP, layers=layers)
    state = opt.init(params)
    step = jax.jit(lambda p, s, b: opt.update(jax.grad(loss_fn)(p, b), s, p, loss_fn=loss_fn,
                                              batch=b))
    for _ in range(STEPS):
        u, state = step(params, state, (x, y))
        params = eqx.apply_updates(params, u)
    return eqx.combine(params, static), opt, state


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_equinox_conv_and_linear_under_vmap_equal_flax_linen():
    rs = np.random.default_rng(0)
    x, y = rs.normal(size=(B, 7, 6, 2)), jnp.asarray(rs.integers(0, CLASSES, B))
    m = EqxCNN(KEY)
    params = {"params": {"Conv_0": {"kernel": m.conv.weight.transpose(2, 3, 1, 0),
                                    "bias": m.conv.bias.reshape(-1)},
                         "Dense_0": {"kernel": m.fc.weight.T, "bias": m.fc.bias}}}
    out, opt, state = _eqx_run(m, jnp.asarray(x.transpose(0, 3, 1, 2)), y)
    ref = _jax_run(FlaxCNN(), params, jnp.asarray(x), y, expect_layers=2)["params"]
    _close(out.conv.weight.transpose(2, 3, 1, 0), ref["Conv_0"]["kernel"])
    _close(out.conv.bias.reshape(-1), ref["Conv_0"]["bias"])
    _close(out.fc.weight.T, ref["Dense_0"]["kernel"])
    assert np.abs(np.asarray(out.conv.weight - m.conv.weight)).max() > 1e-3
    report = grng_jax.describe(opt, state, eqx.filter(out, eqx.is_array))
    assert report.kfac_share == 1.0 and {e.layer for e in report.entries} == {"conv", "fc"}


class Tokens(eqx.Module):
    """A Linear applied to every position by nested vmaps (batch, then positions)."""

    proj: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.proj = eqx.nn.Linear(4, 5, dtype=jnp.float64, key=k1)
        self.head = eqx.nn.Linear(5, CLASSES, dtype=jnp.float64, key=k2)

    def __call__(self, x):  # (T, 4) of one example
        return self.head(jnp.tanh(jax.vmap(self.proj)(x)).mean(0))


class FlaxTokens(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, T, 4)
        return fnn.Dense(CLASSES)(jnp.tanh(fnn.Dense(5)(x)).mean(1))


def test_nested_vmaps_collect_every_position():
    rs = np.random.default_rng(1)
    x, y = jnp.asarray(rs.normal(size=(B, 6, 4))), jnp.asarray(rs.integers(0, CLASSES, B))
    m = Tokens(KEY)
    # flax names the head Dense_0 (constructed first)
    params = {"params": {"Dense_1": {"kernel": m.proj.weight.T, "bias": m.proj.bias},
                         "Dense_0": {"kernel": m.head.weight.T, "bias": m.head.bias}}}
    out, _, _ = _eqx_run(m, x, y)
    ref = _jax_run(FlaxTokens(), params, x, y, expect_layers=2)["params"]
    _close(out.proj.weight.T, ref["Dense_1"]["kernel"])
    _close(out.head.weight.T, ref["Dense_0"]["kernel"])
    assert np.abs(np.asarray(out.proj.weight - m.proj.weight)).max() > 1e-3


def test_find_layers_reads_the_orientation_and_a_wrong_one_is_refused():
    m = eqx.nn.MLP(4, 4, 4, 1, use_bias=False, use_final_bias=False, key=KEY)  # square
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, 4)))
    y = jnp.zeros((B,), jnp.int32)
    params, static = eqx.partition(m, eqx.is_array)

    def loss_fn(p, b):
        return _ce(jax.vmap(eqx.combine(p, static))(b[0]), b[1])

    found = grng_jax.find_layers(loss_fn, params, (x, y))
    assert [(L.weight, L.transposed) for L in found] == [
        (("layers", 0, "weight"), False), (("layers", 1, "weight"), False)]
    wrong = [grng_jax.Layer(L.weight) for L in found]  # transposed=True: the Flax layout
    with pytest.raises(ValueError, match="stores it the other way"):
        _eqx_run(m, x, y, layers=wrong)
    out, _, state = _eqx_run(m, x, y, layers=found)
    assert len(state.core.curvature.kfac) == 2 and int(state.core.skipped) == 0
