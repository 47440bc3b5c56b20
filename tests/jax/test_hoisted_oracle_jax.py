"""grng_jax runs ĝ's oracle passes (RENG's Hessian-vector product, R-Kalman's shifted
gradients) outside the refresh `lax.switch` (`grng_core.hoisted_oracle`): XLA:CPU runs
convolution gradients several times slower inside a conditional branch
(`python -m benchmarks.xla_cond_conv`). The jitted steps equal those with every branch
computed in-graph (refresh="where", which calls the oracle in the step), and the switch's
branches hold no more convolutions than RING's, whose step calls no oracle."""

from __future__ import annotations

import flax.linen as nn
import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x))
        x = nn.tanh(nn.Conv(4, (3, 3), strides=2, param_dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64)(x.mean((1, 2)))


def _setup():
    model = CNN()
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (6, 6, 6, 2), dtype=jnp.float64)
    y = jax.random.randint(key, (6,), 0, 3)
    params = model.init(key, x)

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]),
                                                               b[1]).mean()
    return params, (x, y), loss_fn


def _run(opt, params, batch, loss_fn, steps=12):
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p, batch)
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params, step


BUILDERS = {"reng": lambda **k: grng_jax.reng(**k),
            "reng_fd": lambda **k: grng_jax.reng(gr="finite_difference", **k),
            "rkalman": lambda **k: grng_jax.rkalman(**k)}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_hoisted_oracle_steps_equal_the_in_graph_ones(name):
    params, batch, loss_fn = _setup()
    kw = dict(curvature_every=3, inverse_every=3)
    hoisted, _ = _run(BUILDERS[name](**kw), params, batch, loss_fn)
    in_graph, _ = _run(BUILDERS[name](refresh="where", **kw), params, batch, loss_fn)
    for a, b in zip(jax.tree_util.tree_leaves(hoisted), jax.tree_util.tree_leaves(in_graph)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree_util.tree_leaves(hoisted), jax.tree_util.tree_leaves(params))]
    assert max(moved) > 1e-3  # the steps did something


def _convs_in_branches(jaxpr, inside=False) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and inside:
            n += 1
        branch = eqn.primitive.name == "cond"
        for sub in jax.core.jaxprs_in_params(eqn.params):
            n += _convs_in_branches(sub, inside or branch)
    return n


def test_the_switch_branches_hold_no_oracle_pass():
    params, batch, loss_fn = _setup()
    counts = {}
    for name, opt in (("ring", grng_jax.ring()), ("reng", grng_jax.reng()),
                      ("reng_where", grng_jax.reng(refresh="where"))):
        state = opt.init(params)
        g = jax.grad(loss_fn)(params, batch)
        jaxpr = jax.make_jaxpr(lambda g, s, p, opt=opt: opt.update(
            g, s, p, loss_fn=loss_fn, batch=batch))(g, state, params)
        counts[name] = _convs_in_branches(jaxpr.jaxpr)
    assert counts["reng_where"] == 0  # no switch: nothing inside a branch
    assert counts["ring"] > 0  # the statistics pass of the refresh branches
    assert counts["reng"] == counts["ring"]
