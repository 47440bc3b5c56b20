"""Models and problems shared by the JAX adapter tests (plain jax.numpy, tagged dense layers)."""

from __future__ import annotations

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grng_core.reference import ill_conditioned_least_squares, ill_conditioned_logistic


# ----------------------------------------------------------------------------- MLP
def mlp_params(sizes, seed=0, dtype=jnp.float64):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    return [grng_jax.init_dense(k, a, b, dtype=dtype)
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_logits(params, x, activation=jnp.tanh):
    for i, layer in enumerate(params):
        x = grng_jax.dense(x, layer["kernel"], layer.get("bias"))
        if i < len(params) - 1:
            x = activation(x)
    return x


def softmax_ce(params, batch):
    """Mean softmax cross-entropy; batch = (x, integer labels) or (x, one-hot / probabilities)."""
    x, y = batch[0], batch[1]
    z = mlp_logits(params, x)
    if jnp.issubdtype(y.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(z), axis=-1))


def half_mse(params, batch):
    """Mean of ½‖f(x) − y‖² (the reference MLP's "mse")."""
    x, y = batch[0], batch[1]
    r = mlp_logits(params, x) - y
    return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))


# ------------------------------------------------------------------------ problems
def least_squares(dtype=jnp.float64, n=64, d=6, cond=10.0):
    """Linear least squares through one tagged dense layer without bias (a quadratic)."""
    ls = ill_conditioned_least_squares(n, d, cond, seed=0)
    params = [{"kernel": jnp.zeros((d, 1), dtype)}]
    batch = (jnp.asarray(ls.x, dtype), jnp.asarray(ls.y, dtype))
    return params, batch, half_mse, ls.loss_opt


def _logistic_optimum(x, labels):
    """min over (w, c) of the mean log-loss of sigmoid(x w + c), by Newton's method."""
    X = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    w = np.zeros(X.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-X @ w))
        g = X.T @ (p - labels) / len(labels)
        H = (X * (p * (1 - p))[:, None]).T @ X / len(labels)
        w = w - np.linalg.solve(H + 1e-12 * np.eye(len(w)), g)
    z = X @ w
    return float(np.mean(np.logaddexp(0.0, z) - labels * z))


def logistic(dtype=jnp.float64, n=64, d=4, cond=10.0):
    """Binary logistic regression as a 2-class softmax dense layer with bias."""
    lg = ill_conditioned_logistic(n, d, cond, seed=0)
    params = [{"kernel": jnp.zeros((d, 2), dtype), "bias": jnp.zeros((2,), dtype)}]
    batch = (jnp.asarray(lg.x, dtype), jnp.asarray(lg.labels, jnp.int32))
    return params, batch, softmax_ce, _logistic_optimum(lg.x, lg.labels)


# --------------------------------------------------------------------- training
def make_step(opt, loss_fn, **extra):
    """One train step (not jitted): grads, the optimizer's update, the new params."""

    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, loss_fn=loss_fn, batch=batch,
                                    **extra)
        return optax.apply_updates(params, updates), state, loss

    return step


def run_steps(opt, loss_fn, params, batch, n_steps):
    """`n_steps` full-batch steps inside one jitted fori_loop; returns (params, state)."""
    step = make_step(opt, loss_fn)

    @jax.jit
    def run(params, state):
        def body(_, carry):
            p, s = carry
            p, s, _ = step(p, s, batch)
            return p, s

        return jax.lax.fori_loop(0, n_steps, body, (params, state))

    return run(params, opt.init(params))
