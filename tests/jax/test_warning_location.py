"""grng_jax's warnings point at the user's line (grng_core.user_frame), through jit traces and
nnx / equinox wrappers, not at the library's frames or at "sys:1" (an overshooting stacklevel)."""

from __future__ import annotations

import equinox as eqx
import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.jax import _problems as P

HERE = __file__


def _bias_less():
    return {"a": {"weight": jnp.zeros((16, 16))}, "b": {"weight": jnp.zeros((16, 16))},
            "out": {"weight": jnp.zeros((2, 16)), "bias": jnp.zeros(2)}}


def test_init_warning_points_at_the_init_call():
    with pytest.warns(UserWarning, match="weight matrices") as caught:
        grng_jax.ring().init(_bias_less())
    assert caught[0].filename == HERE


def test_init_warning_inside_nnx_optimizer_points_at_the_user():
    class Model(nnx.Module):
        def __init__(self):
            self.mix = nnx.Param(jnp.zeros((16, 16)))  # not a layer by name
            self.out = nnx.Linear(16, 2, rngs=nnx.Rngs(2))

    with pytest.warns(UserWarning, match="weight matrices") as caught:
        nnx.Optimizer(Model(), grng_jax.ring(), wrt=nnx.Param)
    assert caught[0].filename == HERE


def test_init_warning_under_eqx_filter_jit_points_at_the_user():
    params = _bias_less()
    with pytest.warns(UserWarning, match="weight matrices") as caught:
        eqx.filter_jit(grng_jax.ring().init)(params)
    assert caught[0].filename == HERE


def test_an_eager_skipped_step_warns_at_the_update_call():
    params = P.mlp_params((3, 4, 2))
    x = jnp.full((6, 3), jnp.nan)
    batch = (x, jnp.arange(6) % 2)
    opt = grng_jax.ring(0.1)
    state = opt.init(params)
    grads = jax.grad(P.softmax_ce)(params, batch)
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        _, new = opt.update(grads, state, params, loss_fn=P.softmax_ce, batch=batch)
    assert int(new.core.skipped) == 1
    assert caught[0].filename == HERE, [w.filename for w in caught]
    assert np.isfinite(np.asarray(jax.tree.leaves(params)[0])).all()


def test_a_step_skipped_under_jit_warns_at_the_step_call():
    """Where jax.debug.callback runs on the calling thread (the CPU here) the warning names
    that line; on a runtime thread no user frame exists, and it never names GRNG's frames."""
    params = P.mlp_params((3, 4, 2))
    batch = (jnp.full((6, 3), jnp.nan), jnp.arange(6) % 2)
    opt = grng_jax.ring(0.1)
    step = jax.jit(lambda p, s: opt.update(jax.grad(P.softmax_ce)(p, batch), s, p,
                                           loss_fn=P.softmax_ce, batch=batch))
    with pytest.warns(RuntimeWarning, match="skipped") as caught:
        _, state = jax.block_until_ready(step(params, opt.init(params)))
    assert int(state.core.skipped) == 1
    assert caught[0].filename == HERE or "grng" not in caught[0].filename, caught[0].filename
