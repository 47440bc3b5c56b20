"""A covered layer type called in a configuration K-FAC does not cover (a grouped or depthwise
convolution, circular padding) is refused at the first update naming that option and the fix
that works (`find_layers`, which leaves it to the diagonal), not advising to call it through
the covered layer it already is (flax.linen, flax.nnx and equinox alike)."""

import re

import equinox as eqx
import flax.linen as fnn
import grng_jax
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

X = jnp.ones((4, 6, 6, 4))
Y = jnp.arange(4) % 3


def _linen(**conv):
    class M(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3)(fnn.Conv(8, (3, 3), **conv)(x).mean((1, 2)))
    m = M()
    params = m.init(jax.random.PRNGKey(0), X)
    return params, lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
        m.apply(p, b[0]), b[1]).mean()


def _nnx_grouped():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(4, 8, (3, 3), feature_group_count=2, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.conv(x).mean((1, 2)))
    graphdef, params = nnx.split(M(nnx.Rngs(0)), nnx.Param)
    return params, lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(b[0]), b[1]).mean()


def _equinox_grouped():
    conv = eqx.nn.Conv2d(4, 8, 3, groups=2, key=jax.random.PRNGKey(0))
    head = eqx.nn.Linear(8, 3, key=jax.random.PRNGKey(1))
    params = (conv, head)

    def loss_fn(p, b):
        c, h = p
        z = jax.vmap(lambda x: h(c(jnp.moveaxis(x, -1, 0)).mean((1, 2))))(b[0])
        return optax.softmax_cross_entropy_with_integer_labels(z, b[1]).mean()
    return params, loss_fn


CASES = {
    "linen grouped": (lambda: _linen(feature_group_count=4),
                      "flax.linen Conv with feature_group_count=4 (grouped or depthwise)"),
    "linen circular": (lambda: _linen(padding="CIRCULAR"), "flax.linen Conv with padding="
                                                            "'CIRCULAR'"),
    "nnx grouped": (_nnx_grouped, "nnx.Conv with feature_group_count=2"),
    "equinox grouped": (_equinox_grouped, "eqx.nn.Conv with groups=2"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_naming_the_option_and_find_layers_leaves_it_out(case):
    build, named = CASES[case]
    params, loss_fn = build()
    batch = (X, Y)
    g = jax.grad(loss_fn)(params, batch)
    auto = grng_jax.ring()
    with pytest.raises(ValueError, match=re.escape(f"is called as {named}") +
                       r".*leave it to the diagonal with layers=grng_jax\.find_layers"):
        auto.update(g, auto.init(params), params, loss_fn=loss_fn, batch=batch)
    found = grng_jax.find_layers(loss_fn, params, batch)
    assert len(found) == 1  # the head only: the convolution is left to the diagonal
    # its kernel carries the configuration as the reason (an equinox conv's (C, 1, 1) bias is
    # a vector, not a weight matrix: no reason of its own)
    assert found.reasons and all(f"called as {named}" in why for why in found.reasons.values())
    opt = grng_jax.ring(layers=found)
    state = opt.init(params)
    updates, state = opt.update(g, state, params, loss_fn=loss_fn, batch=batch)
    assert int(state.core.skipped) == 0
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))


def test_a_jit_inside_loss_fn_is_named_in_the_refusal():
    model = fnn.Dense(3)
    x = jnp.ones((4, 5))
    params = model.init(jax.random.PRNGKey(0), x)
    apply = jax.jit(model.apply)  # common, and hides the layer's call from the hooks

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, b[0]), b[1]).mean()

    opt = grng_jax.ring()
    g = jax.grad(loss_fn)(params, (x, Y))
    with pytest.raises(ValueError, match=r"outside a jax\.jit inside loss_fn \(jit the whole"):
        opt.update(g, opt.init(params), params, loss_fn=loss_fn, batch=(x, Y))
