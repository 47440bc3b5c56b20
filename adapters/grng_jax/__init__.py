"""grng_jax: RENG, RING and R-Kalman as optax gradient transformations.

Put ``grng_jax.ring(...)`` where ``optax.adamw(...)`` was and hand the update what the
curvature needs: the loss and the batch::

    import grng_jax, optax, jax

    opt = grng_jax.ring()   # the recommended defaults (README "Defaults"); structure="kfac"
    state = opt.init(params)

    @jax.jit
    def train_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(params, updates), state, loss

    grng_jax.save("opt.npz", opt, state)                  # hyperparameters recorded
    state = grng_jax.load("opt.npz", opt, like=opt.init(params))   # and checked

``loss_fn(params, batch)`` returns the mean loss over the batch's leading axis. From it the
adapter derives per-example gradients (``vmap`` of ``grad``), Hessian-vector products (``jvp``
of ``grad``), gradients at shifted parameters (finite differences) and, for K-FAC, the inputs
and output gradients of the layers the model calls through :func:`dense`, flax.linen's
Dense / DenseGeneral / Conv / Embed, flax.nnx's Linear / LinearGeneral / Conv / Embed or
equinox's nn.Linear / nn.Conv (see :mod:`grng_jax._tags`; models that expose none
fall back to the diagonal structure; :func:`describe` lists what each leaf got). The
factories' keywords are the fields of grng_core's config records
(``help(grng_jax.ring)``). The state is a pytree of arrays (:class:`GRNGState`): any pytree
checkpointer saves it, and :func:`save` / :func:`load` write grng_core's portable ``.npz``
(see :mod:`grng_jax._checkpoint`). Examples: :mod:`grng_jax.examples`.
"""

from grng_jax._accumulate import MultiStepsState, multi_steps
from grng_jax._builders import reng, ring, rkalman
from grng_jax._checkpoint import load, save
from grng_jax._describe import report as describe
from grng_jax._flax_serialization import register_if_flax
from grng_jax._layers import Layer, find_layers
from grng_jax._nnx import loss_fn_of as nnx_loss_fn
from grng_jax._optax import GRNGState, mc_softmax_cross_entropy, mc_squared_error
from grng_jax._tags import dense, init_dense

register_if_flax()  # flax.serialization of a state with K-FAC layers

__all__ = [
    "GRNGState",
    "MultiStepsState",
    "Layer",
    "dense",
    "describe",
    "find_layers",
    "init_dense",
    "load",
    "mc_softmax_cross_entropy",
    "mc_squared_error",
    "multi_steps",
    "nnx_loss_fn",
    "reng",
    "ring",
    "rkalman",
    "save",
]

_REPLACED = {"save_state": "save(path, opt, state)", "load_state": "load(path, opt, like)"}


def __getattr__(name: str):
    if name in _REPLACED:
        raise AttributeError(f"grng_jax.{name} was replaced by grng_jax.{_REPLACED[name]}, "
                             "which records and checks the optimizer's hyperparameters")
    raise AttributeError(f"module 'grng_jax' has no attribute {name!r}")
