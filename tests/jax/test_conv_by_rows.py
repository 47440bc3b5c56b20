"""grng_jax._tags.conv_by_rows: in the statistics pass a convolution's input gradient flows
through its patches times the kernel (a matmul and the gather's transpose) instead of the
convolution's transpose, which XLA:CPU runs several times slower inside the refresh
`lax.switch` (`python -m benchmarks.xla_cond_conv`). The statistics equal those through the
convolution's own transpose (float64), for flax (kernel (*k, in, out)) and equinox (weight
(out, in, *k), under vmap), strided, dilated and padded; the pass's program holds no
convolution but the forward ones."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from grng_jax import _collect, _tags
from grng_jax._layers import resolve_layers


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        f64 = dict(param_dtype=jnp.float64)
        x = nn.tanh(nn.Conv(3, (3, 3), **f64)(x))
        x = nn.tanh(nn.Conv(4, (2, 3), strides=(2, 1), padding=((1, 0), (0, 2)), **f64)(x))
        x = nn.tanh(nn.Conv(3, (3, 3), kernel_dilation=2, padding="VALID", **f64)(x))
        return nn.Dense(3, param_dtype=jnp.float64)(x.mean((1, 2)))


def _flax_case():
    model, key = FlaxCNN(), jax.random.PRNGKey(0)
    x = jax.random.normal(key, (4, 9, 9, 2), dtype=jnp.float64)
    y = jax.random.randint(key, (4,), 0, 3)
    params = model.init(key, x)

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]),
                                                               b[1]).mean()
    return loss_fn, params, (x, y), 3


def _equinox_case():
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    convs = [eqx.nn.Conv2d(2, 3, 3, padding=1, key=keys[0]),
             eqx.nn.Conv2d(3, 3, 3, stride=2, padding=((1, 0), (1, 1)), key=keys[1])]
    head = eqx.nn.Linear(3, 3, key=keys[2])
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a,
                                   (convs, head))
    x = jax.random.normal(keys[3], (4, 2, 7, 7), dtype=jnp.float64)
    y = jax.random.randint(keys[3], (4,), 0, 3)

    def one(m, xi):
        cs, h = m
        for c in cs:
            xi = jnp.tanh(c(xi))
        return h(xi.mean((1, 2)))

    def loss_fn(m, b):
        logits = jax.vmap(one, in_axes=(None, 0))(m, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()
    return loss_fn, model, (x, y), 2


def _stats(case, monkeypatch, by_rows: bool):
    loss_fn, params, batch, n_convs = case
    if not by_rows:
        monkeypatch.setattr(_tags, "conv_by_rows", lambda rows, kernel, z, transposed: z)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = resolve_layers(params, "auto")
    stats = _collect.layer_stats(loss_fn, treedef, leaves, batch, specs)
    jaxpr = jax.make_jaxpr(lambda lv: [(s.inputs, s.output_grads) for s in
                                       _collect.layer_stats(loss_fn, treedef, lv, batch,
                                                            specs)])(leaves)
    convs = sum(1 for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated")
    monkeypatch.undo()
    return stats, convs, n_convs


@pytest.mark.parametrize("make", [_flax_case, _equinox_case], ids=["flax", "equinox"])
def test_statistics_equal_those_through_the_convolution_transpose(make, monkeypatch):
    case = make()
    got, convs_got, n_convs = _stats(case, monkeypatch, by_rows=True)
    want, convs_want, _ = _stats(case, monkeypatch, by_rows=False)
    assert len(got) == len(want) >= n_convs + 1
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g.inputs), np.asarray(w.inputs), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(g.output_grads), np.asarray(w.output_grads),
                                   rtol=1e-10, atol=1e-13)
        assert float(jnp.abs(g.output_grads).max()) > 0
    assert convs_got == n_convs  # the forward convolutions only
    assert convs_want > n_convs  # the transposes of all but the first
