"""flax.nnx layers the K-FAC collection hooks (`grng_jax._patch`): Linear, LinearGeneral
(also the projections inside nnx.MultiHeadAttention), Conv and Embed, with the row helpers
of flax.linen's equivalents (`grng_jax._flax`; the attributes have the same names). A
configuration they do not cover (LinearGeneral batch_axis, grouped / masked / circular
convolutions) leaves the call untagged; ``Embed.attend`` (a tied output layer) is recorded as
another use of the table."""

from __future__ import annotations

from typing import Any

from grng_jax import _flax
from grng_jax._patch import hook_method
from grng_jax._uncovered import uncovered


def _value(var):
    return None if var is None else var[...]


def _tag(col, mod, got, out, name: str, attr: str = "kernel"):
    kernel = _value(getattr(mod, attr))
    if isinstance(got, str):
        col.used_otherwise(kernel, uncovered(f"nnx.{name}", got))
        return out
    rows, kind, in_axes = got
    return col.tag(rows, kernel, _value(getattr(mod, "bias", None)), out, kind, in_axes)


def _linear(col, mod, x, out):
    return _tag(col, mod, (x, "dense", 1), out, "Linear")


def _linear_general(col, mod, x, out):
    got: Any = f"batch_axis={mod.batch_axis}"
    if not mod.batch_axis:
        axes = _flax._axes(mod.axis, x.ndim)
        got = _flax.dense_general_rows(x, axes)
    return _tag(col, mod, got, out, "LinearGeneral")


def _conv(col, mod, x, out):
    return _tag(col, mod, _flax.conv(mod, x), out, "Conv")


def _embed(col, mod, ids, out):
    return _tag(col, mod, _flax.embed(mod, ids), out, "Embed", "embedding")


def _attend(col, mod, query, out):
    col.used_otherwise(_value(mod.embedding), "nnx.Embed.attend")
    return out


def _batch_norm(col, mod, args, kwargs, out):
    if _flax.batch_norm_training(mod, args, kwargs):
        col.batch_coupled.append(f"an nnx.BatchNorm({mod.num_features})")
    return out


def install() -> None:
    from flax import nnx

    hook_method(nnx.Linear, "__call__", _linear)
    hook_method(nnx.LinearGeneral, "__call__", _linear_general)
    hook_method(nnx.Conv, "__call__", _conv)
    hook_method(nnx.Embed, "__call__", _embed)
    hook_method(nnx.Embed, "attend", _attend)
    hook_method(nnx.BatchNorm, "__call__", _batch_norm, with_call=True)


def loss_fn_of(model, loss, wrt=None):
    """``loss_fn(params, batch[, key])`` for a flax.nnx model: ``loss(model, batch[, key])``
    evaluated on ``nnx.merge(graphdef, params, rest)``, with the graph and the variables
    outside `wrt` (default ``nnx.Param``, as in ``nnx.Optimizer(model, tx, wrt=nnx.Param)``)
    taken from `model` now, as values (a snapshot: the model's later calls advance its RNG
    counts, not this). Build it inside the train step (after ``nnx.jit``) *before* the
    gradient pass, so that the optimizer's passes draw the dropout masks of that pass. Each
    call merges a copy (``copy=True``): the optimizer's passes run under its own
    transformations, where flax refuses to mutate the model's BatchNorm statistics or Dropout
    RNG counts, and those passes must not change the model's state anyway."""
    import jax
    from flax import nnx

    parts: Any = nnx.split(model, nnx.Param if wrt is None else wrt, ...)
    graphdef = parts[0]
    rest = jax.tree_util.tree_map(lambda x: x, parts[2])  # new Variables: today's values

    def loss_fn(params, batch, *key):
        try:
            merged = nnx.merge(graphdef, params, rest, copy=True)
        except ValueError as e:  # flax's "Incorrect number of leaves"
            raise ValueError(
                f"grng_jax.nnx_loss_fn: the params the optimizer was handed are not the "
                f"model's {'nnx.Param' if wrt is None else wrt} variables this loss_fn was "
                f"built for ({e}): build it with the wrt of nnx.Optimizer(model, tx, wrt=...),"
                " grng_jax.nnx_loss_fn(model, loss, wrt=wrt)") from e
        return loss(merged, batch, *key)

    loss_fn.grng_nnx = True  # type: ignore[attr-defined]  # (`hinted` leaves it as it is)
    return loss_fn


def hinted(name: str, loss_fn, params):
    """`loss_fn` as given, or, where the params are a flax.nnx State and it is not
    `loss_fn_of`'s, wrapped so that the error a loss of the model (``loss(model, batch)``)
    raises on a State ('State' object is not callable, has no attribute ...) names the fix.
    Only while tracing: the wrapper adds nothing to a compiled step."""
    if loss_fn is None or getattr(loss_fn, "grng_nnx", False) \
            or not type(params).__module__.startswith("flax.nnx"):
        return loss_fn

    def checked(p, *args):
        try:
            return loss_fn(p, *args)
        except (TypeError, AttributeError) as e:
            if "'State'" not in str(e):
                raise
            raise TypeError(
                f"grng_jax.{name}: loss_fn(params, batch) failed on the params, a flax.nnx "
                f"State ({type(e).__name__}: {e}): it looks like a loss of the model, "
                "loss(model, batch). Pass loss_fn=grng_jax.nnx_loss_fn(model, loss), built "
                "inside the train step before the gradient pass (README, JAX: flax.nnx)") from e
    return checked
