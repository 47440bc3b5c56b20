"""Tracing an update never asks a JAX tracer for its device: a tracer's `.device` raises an
error whose message (`DynamicJaxprTracer._origin_msg`) walks the whole program traced so
far, which made tracing R-Kalman's step 2.6x slower (grng_core.tree.device)."""

from __future__ import annotations

import grng_jax
import jax
import optax
import pytest
from jax._src.interpreters import partial_eval

from tests.jax import zoo_flax as Z


@pytest.mark.parametrize("name", ["ring", "rkalman"])
def test_tracing_an_update_builds_no_tracer_error_message(name, monkeypatch):
    calls = []
    original = partial_eval.DynamicJaxprTracer._origin_msg

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg", counting)
    model = Z.CharTransformer()  # the 3x case: a transformer with a diagonal position table
    batch = Z.text_batches()(0)
    params = Z.init(model, batch[0])

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]), b[1]).mean()
    opt = getattr(grng_jax, name)()
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss_fn)(p, batch), s, p, loss_fn=loss_fn,
                                           batch=batch))
    step.trace(params, opt.init(params))
    assert not calls
