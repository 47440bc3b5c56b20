"""The flax.linen zoo (tests/jax/zoo_flax.py) trains with grng_jax at its defaults
(`grng_jax.ring()`: the recommended setting, README "Defaults"), jitted: K-FAC on every Conv /
Dense / attention projection / Embed (describe()), no skipped step, the loss falls (the CNN: from
10% to at least 60% accuracy on digits in 150 steps)."""

from __future__ import annotations

import warnings

import grng_jax
import jax
import jax.numpy as jnp
import optax
import pytest

from tests.jax import zoo_flax as Z

pytest.importorskip("sklearn")
SETTING: dict = {}  # the defaults
OPTIMIZERS = {"ring": {}, "ring-gauss_newton": dict(form="gauss_newton"), "reng": {},
              "rkalman": {}}


def _train(model, params, batch, steps, name="ring"):
    opt = getattr(grng_jax, name.split("-")[0])(**SETTING, **OPTIMIZERS[name])

    def loss_fn(p, b):
        logits = model.apply(p, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not mostly diagonal
        state = opt.init(params)

    @jax.jit
    def step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=b)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for k in range(steps):
        params, state, loss = step(params, state, batch(k))
        losses.append(float(loss))
    return params, opt, state, losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flax_cnn_on_digits(name):
    batch, (x, y) = Z.digits_batches()
    model = Z.CNN()
    params, opt, state, losses = _train(model, Z.init(model, x[:1]), batch, 150, name)
    report = grng_jax.describe(opt, state, params)
    assert report.kfac_share == 1.0 and report.skipped == 0
    acc = float((model.apply(params, x).argmax(-1) == y).mean())
    assert acc >= 0.6, (acc, losses[::15])
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flax_char_transformer(name):
    batch = Z.text_batches()
    model = Z.CharTransformer()
    params, opt, state, losses = _train(model, Z.init(model, batch(0)[0]), batch, 60, name)
    report = grng_jax.describe(opt, state, params)
    layers = {e.layer for e in report.entries if e.layer}
    for part in ("Embed_0", "query", "key", "value", "out", "Dense_0", "Dense_2"):
        assert any(n.endswith(part) for n in layers), (part, sorted(layers))
    assert report.skipped == 0
    assert jnp.all(jnp.isfinite(jnp.asarray(losses)))
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.3, losses[::6]
