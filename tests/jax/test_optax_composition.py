"""grng_jax inside optax combinators: optax.masked and optax.multi_transform (grng_jax on
the dense layers, adamw on the rest) with full_params=; without it a clear error. Reference:
the masked run's grng leaves equal a grng_jax run on a model whose other leaves are constants
(the same loss as a function of those leaves) to 1e-10."""

from __future__ import annotations

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"l1": grng_jax.init_dense(k1, 5, 8, dtype=jnp.float64),
            "l2": grng_jax.init_dense(k2, 8, 3, dtype=jnp.float64),
            "scale": jnp.ones((8,), jnp.float64)}


def loss_fn(p, batch):
    x, y = batch
    h = jnp.tanh(grng_jax.dense(x, p["l1"]["kernel"], p["l1"]["bias"])) * p["scale"]
    logits = grng_jax.dense(h, p["l2"]["kernel"], p["l2"]["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch(k):
    rs = np.random.default_rng(k)
    return jnp.asarray(rs.normal(size=(16, 5))), jnp.asarray(rs.integers(0, 3, 16))


MASK = {"l1": {"kernel": True, "bias": True}, "l2": {"kernel": True, "bias": True},
        "scale": False}


def _run(opt, steps=3, **kw):
    params = _params()
    state = opt.init(params)
    for k in range(steps):
        batch = _batch(k)
        grads = jax.grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, loss_fn=loss_fn, batch=batch,
                                    **({"full_params": params} if kw.get("full") else {}))
        params = optax.apply_updates(params, updates)
    return params


def test_masked_grng_equals_grng_on_its_leaves():
    ring = grng_jax.ring(0.1, damping=1e-2)
    frozen = jax.tree_util.tree_map(lambda m: not m, MASK)  # masked leaves pass raw updates
    got = _run(optax.chain(optax.masked(ring, MASK), optax.masked(optax.set_to_zero(), frozen)),
               full=True)
    # reference: grng_jax over the dense layers only, `scale` held fixed inside the loss
    fixed = _params()["scale"]
    params = {k: v for k, v in _params().items() if k != "scale"}
    state = ring.init(params)

    def sub_loss(p, batch):
        return loss_fn({**p, "scale": fixed}, batch)

    for k in range(3):
        batch = _batch(k)
        grads = jax.grad(sub_loss)(params, batch)
        updates, state = ring.update(grads, state, params, loss_fn=sub_loss, batch=batch)
        params = optax.apply_updates(params, updates)
    for name in ("l1", "l2"):
        np.testing.assert_allclose(np.asarray(got[name]["kernel"]),
                                   np.asarray(params[name]["kernel"]), rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(got["scale"]), np.asarray(fixed))
    assert np.abs(np.asarray(got["l1"]["kernel"] - _params()["l1"]["kernel"])).max() > 1e-3


def test_multi_transform_grng_and_adamw():
    labels = {"l1": {"kernel": "grng", "bias": "grng"}, "l2": {"kernel": "grng", "bias": "grng"},
              "scale": "adam"}
    opt = optax.multi_transform({"grng": grng_jax.ring(0.1, damping=1e-2),
                                 "adam": optax.adamw(1e-2)}, labels)
    got = _run(opt, full=True)
    assert np.abs(np.asarray(got["scale"]) - 1.0).max() > 1e-3  # adamw moved it
    assert np.isfinite(np.asarray(got["l1"]["kernel"])).all()


def test_kernels_on_grng_biases_elsewhere_take_kfac_without_a_bias_column():
    """GRNG on the kernels, the biases on another transformation (here held fixed): the
    layers are K-FAC blocks without a bias column, although the model adds the biases (from
    full_params=, not this optimizer's leaves). Before, such a call went untagged and the
    first update raised that the layer was not called through a tagged layer. Reference:
    grng_jax over the kernels of a loss that adds the same biases outside the tagged call."""
    kernels = {"l1": {"kernel": True, "bias": False}, "l2": {"kernel": True, "bias": False},
               "scale": False}
    ring = grng_jax.ring(0.1, damping=1e-2)
    frozen = jax.tree_util.tree_map(lambda m: not m, kernels)
    opt = optax.chain(optax.masked(ring, kernels), optax.masked(optax.set_to_zero(), frozen))
    got = _run(opt, full=True)
    state = opt.init(_params())[0].inner_state
    assert [(L.layout.bias, L.layout.d_in_ext) for L in state.core.curvature.kfac] == \
        [(None, 5), (None, 8)]
    start = _params()

    def sub_loss(p, batch):
        x, y = batch
        h = jnp.tanh(grng_jax.dense(x, p["l1"]) + start["l1"]["bias"]) * start["scale"]
        logits = grng_jax.dense(h, p["l2"]) + start["l2"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    params = {"l1": start["l1"]["kernel"], "l2": start["l2"]["kernel"]}
    ring = grng_jax.ring(0.1, damping=1e-2, layers=["l1", "l2"])
    rstate = ring.init(params)
    for k in range(3):
        batch = _batch(k)
        grads = jax.grad(sub_loss)(params, batch)
        updates, rstate = ring.update(grads, rstate, params, loss_fn=sub_loss, batch=batch)
        params = optax.apply_updates(params, updates)
    assert len(rstate.core.curvature.kfac) == 2
    for name in ("l1", "l2"):
        np.testing.assert_allclose(np.asarray(got[name]["kernel"]), np.asarray(params[name]),
                                   rtol=1e-10)
        np.testing.assert_array_equal(np.asarray(got[name]["bias"]),
                                      np.asarray(start[name]["bias"]))
    assert np.abs(np.asarray(got["l1"]["kernel"] - start["l1"]["kernel"])).max() > 1e-3


def test_a_layer_declared_with_its_bias_but_called_with_another_names_the_fix():
    def computed(p, batch):
        x, y = batch
        h = jnp.tanh(grng_jax.dense(x, p["l1"]["kernel"], 2.0 * p["l1"]["bias"]))
        logits = grng_jax.dense(h * p["scale"], p["l2"]["kernel"], p["l2"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    params, batch = _params(), _batch(0)
    opt = grng_jax.ring(0.1)
    with pytest.raises(ValueError, match="'l1/kernel' is declared with bias 'l1/bias' but the "
                                         "model adds a bias that is not that leaf"):
        opt.update(jax.grad(computed)(params, batch), opt.init(params), params,
                   loss_fn=computed, batch=batch)


def test_masked_without_full_params_names_the_fix():
    with pytest.raises(ValueError, match="full_params=params"):
        _run(optax.masked(grng_jax.ring(0.1), MASK), steps=1)


def test_multi_steps_runs_the_optimizer_once_per_real_step():
    """grng_jax.multi_steps(opt, 2): the first micro-step returns zeros and leaves the inner
    state alone; the second equals opt on the mean gradient with that micro-batch's
    statistics. The update sits in a lax.cond (no statistics or inverse on micro-steps)."""
    ring = grng_jax.ring(0.1, damping=1e-2)
    opt = grng_jax.multi_steps(ring, 2)
    params = _params()
    state = opt.init(params)
    b1, b2 = _batch(1), _batch(2)
    g1, g2 = jax.grad(loss_fn)(params, b1), jax.grad(loss_fn)(params, b2)
    u1, state = opt.update(g1, state, params, loss_fn=loss_fn, batch=b1)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(u1))
    assert int(state.inner.core.step) == 0
    u2, state = opt.update(g2, state, params, loss_fn=loss_fn, batch=b2)
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
    want, inner = ring.update(mean, ring.init(params), params, loss_fn=loss_fn, batch=b2)
    for a, b in zip(jax.tree_util.tree_leaves(u2), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
    assert int(state.inner.core.step) == 1 and int(state.mini_step) == 0
    jaxpr = jax.make_jaxpr(lambda g, s: opt.update(g, s, params, loss_fn=loss_fn, batch=b1))(
        g1, state)
    top = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert "cond" in top and "cholesky" not in top  # the inverse only inside the cond
