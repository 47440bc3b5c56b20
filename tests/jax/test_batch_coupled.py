"""BatchNorm in training mode with per-example gradients (structure="woodbury", or
"diagonal" with fisher="mc"): a one-example batch's BatchNorm outputs its bias, so the
per-example gradients would be another function's (zero before the layer, silently). grng_jax
refuses it while the update is traced, naming the layer, before anything changes (as
grng_torch refuses it before its vmap); K-FAC, which needs none, and BatchNorm on its running
averages are unaffected."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx


class Net(nn.Module):
    train: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(6)(x))
        return nn.Dense(3)(jnp.tanh(h))


def _linen(train: bool):
    """(params, loss_fn, mc_loss_fn, batch) of `Net` in training or evaluation mode."""
    model = Net(train)
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
    y = jnp.arange(16) % 3
    v = Net(True).init(jax.random.PRNGKey(1), x)
    stats = v["batch_stats"]

    def logits_fn(p, inputs):
        out = model.apply({"params": p, "batch_stats": stats}, inputs,
                          mutable=["batch_stats"] if train else False)
        return out[0] if train else out

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, batch[0]),
                                                               batch[1]).mean()
    mc = grng_jax.mc_softmax_cross_entropy(lambda p, b: logits_fn(p, b[0]))
    return v["params"], loss_fn, mc, (x, y)


PER_EXAMPLE = [dict(structure="woodbury"), dict(structure="diagonal", fisher="mc")]


@pytest.mark.parametrize("kw", PER_EXAMPLE)
@pytest.mark.parametrize("jit", [False, True])
def test_linen_batchnorm_in_training_mode_is_refused_with_per_example_gradients(kw, jit):
    params, loss_fn, mc, batch = _linen(True)
    opt = grng_jax.ring(**kw)
    state = opt.init(params)
    extra = {"mc_loss_fn": mc} if kw.get("fisher") == "mc" else {}
    grads = jax.grad(loss_fn)(params, batch)

    def update(g, s, p):
        return opt.update(g, s, p, loss_fn=loss_fn, batch=batch, **extra)
    with pytest.raises(ValueError, match="BatchNorm 'BatchNorm_0' in training mode"):
        (jax.jit(update) if jit else update)(grads, state, params)


@pytest.mark.parametrize("kw", [*PER_EXAMPLE[:1], {}])
def test_batchnorm_on_running_averages_or_kfac_trains(kw):
    """Evaluation mode has per-example gradients; K-FAC (the default) needs none."""
    params, loss_fn, _, batch = _linen(train=not kw)
    opt = grng_jax.ring(**kw)
    state = opt.init(params)
    start = loss_fn(params, batch)
    for _ in range(5):
        updates, state = opt.update(jax.grad(loss_fn)(params, batch), state, params,
                                    loss_fn=loss_fn, batch=batch)
        params = optax.apply_updates(params, updates)
    assert float(loss_fn(params, batch)) < float(start)
    assert int(state.core.skipped) == 0


class NnxNet(nnx.Module):
    def __init__(self, running_at_call: bool):
        self.l1, self.l2 = nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 3, rngs=nnx.Rngs(1))
        self.bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0))  # use_running_average=False: training
        self.running_at_call = running_at_call

    def __call__(self, x):
        h = self.bn(self.l1(x), use_running_average=True) if self.running_at_call \
            else self.bn(self.l1(x))
        return self.l2(jnp.tanh(h))


@pytest.mark.parametrize("running_at_call", [False, True])
def test_nnx_batchnorm_in_training_mode_is_refused_not_on_running_averages(running_at_call):
    """The module's mode, or the call's use_running_average=True, which overrides it."""
    model = NnxNet(running_at_call)
    x, y = jax.random.normal(jax.random.PRNGKey(0), (16, 4)), jnp.arange(16) % 3

    def loss(m, batch):
        return optax.softmax_cross_entropy_with_integer_labels(m(batch[0]), batch[1]).mean()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = grng_jax.nnx_loss_fn(model, loss)
    opt = grng_jax.ring(structure="woodbury")
    state = opt.init(params)
    grads = nnx.grad(loss)(model, (x, y))
    if not running_at_call:
        with pytest.raises(ValueError, match=r"an nnx.BatchNorm\(6\) in training mode"):
            opt.update(grads, state, params, loss_fn=loss_fn, batch=(x, y))
        np.testing.assert_array_equal(np.asarray(state.core.step), 0)
        return
    _, state = opt.update(grads, state, params, loss_fn=loss_fn, batch=(x, y))
    assert int(state.core.step) == 1 and int(state.core.skipped) == 0


def test_fisher_mc_checks_the_loss_its_statistics_use():
    """fisher="mc": the per-example gradients are mc_loss_fn's, so its BatchNorm is what
    counts (here in training mode while loss_fn runs on the running averages)."""
    params, eval_loss, _, batch = _linen(False)
    _, _, train_mc, _ = _linen(True)
    opt = grng_jax.ring(structure="diagonal", fisher="mc")
    with pytest.raises(ValueError, match="BatchNorm 'BatchNorm_0' in training mode"):
        opt.update(jax.grad(eval_loss)(params, batch), opt.init(params), params,
                   loss_fn=eval_loss, mc_loss_fn=train_mc, batch=batch)


class EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1, self.l2 = eqx.nn.Linear(4, 6, key=k1), eqx.nn.Linear(6, 3, key=k2)
        self.bn = eqx.nn.BatchNorm(6, axis_name="batch", mode="ema")

    def __call__(self, x, state, inference):
        h, state = self.bn(self.l1(x), state, inference=inference)
        return self.l2(jnp.tanh(h)), state


@pytest.mark.parametrize("inference", [False, True])
def test_equinox_batchnorm_in_training_mode_is_refused_not_in_inference(inference):
    """equinox's BatchNorm averages over the vmap axis it names: one example at a time (the
    per-example gradients' vmap) it would be another function."""
    model, bn_state = eqx.nn.make_with_state(EqxNet)(jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, y = jax.random.normal(jax.random.PRNGKey(1), (16, 4)), jnp.arange(16) % 3

    def loss_fn(p, batch):
        m = eqx.combine(p, static)
        logits, _ = jax.vmap(m, axis_name="batch", in_axes=(0, None, None),
                             out_axes=(0, None))(batch[0], bn_state, inference)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    opt = grng_jax.ring(structure="woodbury")
    state = opt.init(params)
    grads = jax.grad(loss_fn)(params, (x, y))
    if not inference:
        with pytest.raises(ValueError, match=r"an eqx.nn.BatchNorm\(6\) in training mode"):
            opt.update(grads, state, params, loss_fn=loss_fn, batch=(x, y))
        return
    start = loss_fn(params, (x, y))
    for _ in range(3):
        updates, state = opt.update(jax.grad(loss_fn)(params, (x, y)), state, params,
                                    loss_fn=loss_fn, batch=(x, y))
        params = eqx.apply_updates(params, updates)
    assert float(loss_fn(params, (x, y))) < float(start)
    assert int(state.core.skipped) == 0
