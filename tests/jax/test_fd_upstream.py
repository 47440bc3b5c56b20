"""The finite-difference estimators in grng_jax differentiate one function: with an optax
transformation chained before the optimizer (clipping, scaling), the gradient handed to it is
not `loss_fn`'s, and its difference is taken between two passes of `loss_fn`
(`Oracle.own_base`, ALGORITHMS.md §1 "This project"). Reference: on a quadratic loss the
forward difference equals the exact Hessian-vector product, so a finite-difference RENG after
`optax.scale` / `clip_by_global_norm` must match double-backprop RENG after the same
transformation (float64). The central scheme differences two passes of `loss_fn` by its
definition (ĝ = g + ρ(g⁺ − g⁻)/(2ε)) and needs no own base: its cases are the control that
the transformed g still enters as the base gradient, not a test of `own_base`. And
`nnx_loss_fn` built before the gradient pass draws that pass's dropout mask."""

from __future__ import annotations

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

D = 6


def _problem():
    rs = np.random.default_rng(0)
    M = rs.normal(size=(D, D))
    H = jnp.asarray(M @ M.T / D + np.eye(D))  # SPD
    b = jnp.asarray(rs.normal(size=D))

    def loss_fn(p, batch):
        w = p["w"]
        return 0.5 * w @ (batch * H) @ w - b @ w  # batch: a scalar weight (1.0)

    return loss_fn, {"w": jnp.asarray(rs.normal(size=D))}


@pytest.mark.parametrize("scheme", ["forward", "backward", "central"])
@pytest.mark.parametrize("upstream", [optax.scale(0.3), optax.clip_by_global_norm(1e-2)],
                         ids=["scale", "clip"])
def test_fd_after_an_upstream_transformation_matches_the_exact_hvp(scheme, upstream):
    loss_fn, params = _problem()
    kw = dict(structure="diagonal", rho=0.5, kl_clip=None, learning_rate=0.1)
    fd = optax.chain(upstream, grng_jax.reng(gr="finite_difference", fd_scheme=scheme, **kw))
    exact = optax.chain(upstream, grng_jax.reng(gr="double_backprop", **kw))
    batch = jnp.asarray(1.0)
    s_fd, s_ex = fd.init(params), exact.init(params)
    p_fd = p_ex = params
    for _ in range(3):
        g = jax.grad(loss_fn)(p_fd, batch)
        u_fd, s_fd = jax.jit(lambda g, s, p: fd.update(g, s, p, loss_fn=loss_fn, batch=batch))(
            g, s_fd, p_fd)
        g = jax.grad(loss_fn)(p_ex, batch)
        u_ex, s_ex = jax.jit(lambda g, s, p: exact.update(g, s, p, loss_fn=loss_fn,
                                                          batch=batch))(g, s_ex, p_ex)
        np.testing.assert_allclose(u_fd["w"], u_ex["w"], rtol=1e-6, atol=1e-12)
        p_fd, p_ex = optax.apply_updates(p_fd, u_fd), optax.apply_updates(p_ex, u_ex)


def test_nnx_loss_fn_built_before_the_gradient_pass_draws_its_dropout_mask():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 16, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.l2 = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.drop(jax.nn.relu(self.l1(x)) + 1.0))

    def loss(m, x):
        return jnp.mean(m(x) ** 2)

    model = Net(nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)

    @nnx.jit
    def step(model, x):
        loss_fn = grng_jax.nnx_loss_fn(model, loss)
        value = loss(model, x)  # advances the model's dropout RNG count
        params = nnx.state(model, nnx.Param)
        return value, loss_fn(params, x), loss(model, x)

    for _ in range(2):
        value, replayed, next_call = step(model, x)
        np.testing.assert_allclose(replayed, value, rtol=1e-12)  # the same mask
        assert abs(float(next_call) - float(value)) > 1e-6  # a new mask: the check can fail
