"""The flax.nnx and equinox zoo: the digits MLP (64-64-10, tanh) as users write it in each
library, trained with grng_jax at the documented digits setting (grng_jax.examples.DIGITS_HP,
float32, minibatches of 64): K-FAC on every Linear (describe(), no init warning), no skipped
step, and >= 95% test accuracy within 20 epochs, for every optimizer. flax.nnx runs through
``nnx.Optimizer`` (one ``nnx.jit`` step per minibatch) and through ``nnx.split`` with the
optax transformation (a jitted lax.scan epoch, grng_jax.examples.train); equinox calls its
model one example at a time under ``jax.vmap``."""

from __future__ import annotations

import warnings

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grng_jax import examples

from tests import cases

pytest.importorskip("sklearn")
nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")
pytestmark = pytest.mark.slow
EPOCHS, TARGET = 20, 0.95


def _optimizer(algorithm):
    return getattr(grng_jax, algorithm)(**examples.DIGITS_HP[algorithm])


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _check(report, acc, algorithm):
    assert report.kfac_share == 1.0, report
    assert report.skipped == 0, report
    assert acc >= TARGET, f"{algorithm}: {acc:.3f}"


def _init_quietly(opt, params):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return opt.init(params)


@pytest.mark.parametrize("algorithm", cases.OPTIMIZERS)
def test_nnx_mlp_through_split_and_optax(algorithm):
    data = examples.digits()
    graphdef, params, rest = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param, ...)
    opt = _optimizer(algorithm)
    _init_quietly(opt, params)

    def logits(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    run = examples.train(logits, params, opt, data, epochs=EPOCHS, until=TARGET)
    _check(grng_jax.describe(opt, run.state, run.params), run.accuracy, algorithm)


def test_nnx_mlp_through_nnx_optimizer():
    x_tr, y_tr, x_te, y_te = examples.digits()
    model = NnxMLP(nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # init: not mostly diagonal
        optimizer = nnx.Optimizer(model, _optimizer("ring"), wrt=nnx.Param)

    def loss(m, batch):
        return examples.cross_entropy(m(batch[0]), batch[1])

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss_fn = grng_jax.nnx_loss_fn(model, loss)  # before the gradient pass (README)
        value, grads = nnx.value_and_grad(loss)(model, batch)
        optimizer.update(model, grads, loss_fn=loss_fn, batch=batch)
        return value

    rng, acc = np.random.default_rng(0), 0.0
    for _ in range(EPOCHS):
        for idx in rng.permutation(len(y_tr))[: len(y_tr) // 64 * 64].reshape(-1, 64):
            train_step(model, optimizer, (x_tr[idx], y_tr[idx]))
        acc = float(jnp.mean(jnp.argmax(model(x_te), -1) == y_te))
        if acc >= TARGET:
            break
    report = grng_jax.describe(optimizer.tx, optimizer.opt_state, nnx.state(model, nnx.Param))
    assert {e.layer for e in report.entries} == {"l1", "l2"}
    _check(report, acc, "ring")


@pytest.mark.parametrize("algorithm", cases.OPTIMIZERS)
def test_equinox_mlp_under_vmap(algorithm):
    data = examples.digits()
    model = eqx.nn.MLP(64, 10, 64, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)
    opt = _optimizer(algorithm)
    _init_quietly(opt, params)

    def logits(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    run = examples.train(logits, params, opt, data, epochs=EPOCHS, until=TARGET)
    _check(grng_jax.describe(opt, run.state, run.params), run.accuracy, algorithm)
