"""grng_jax: RENG, RING and R-Kalman as optax gradient transformations.

Put ``grng_jax.ring(...)`` where ``optax.adamw(...)`` was and hand the update what the
curvature needs: the loss and the batch::

    import grng_jax, optax, jax

    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      grng_jax.ring(1e-1, rho=0.05, damping=1e-3))   # structure="kfac"
    state = opt.init(params)

    @jax.jit
    def train_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(params, updates), state, loss

``loss_fn(params, batch)`` returns the mean loss over the batch's leading axis. From it the
adapter derives per-example gradients (``vmap`` of ``grad``), Hessian-vector products (``jvp``
of ``grad``), gradients at shifted parameters (finite differences) and, for K-FAC, the inputs
and output gradients of the dense layers the model calls through :func:`dense` or
``flax.linen.Dense`` (see :mod:`grng_jax._tags`; models that expose none fall back to the
diagonal structure). The state is a pytree of arrays (:class:`GRNGState`): any pytree
checkpointer saves it, and :func:`save_state` / :func:`load_state` write grng_core's portable
``.npz``. Examples: :mod:`grng_jax.examples`.
"""

from grng_jax._checkpoint import load_state, save_state
from grng_jax._layers import Layer, find_layers
from grng_jax._optax import (
    GRNGState,
    mc_softmax_cross_entropy,
    mc_squared_error,
    reng,
    ring,
    rkalman,
)
from grng_jax._tags import dense, init_dense

__all__ = [
    "GRNGState",
    "Layer",
    "dense",
    "find_layers",
    "init_dense",
    "load_state",
    "mc_softmax_cross_entropy",
    "mc_squared_error",
    "reng",
    "ring",
    "rkalman",
    "save_state",
]
