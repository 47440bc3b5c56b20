"""Tagged layers called inside a nested transformation of the loss (`grng_jax._tags`).

``jax.vmap`` (equinox's usual ``jax.vmap(model)(x)``, per-example layers) is covered: the call
goes through a ``jax.custom_batching.custom_vmap`` function whose batching rule runs in the
enclosing trace with the whole batch's inputs and outputs, where the collector records them
and adds the perturbation (nested vmaps unwrap one level per rule). Other transformations
(``lax.scan`` / ``nn.scan``, ``jax.checkpoint`` / ``nn.remat``, a nested ``jax.jit``, control
flow) trace their body separately with the parameters lifted into it; a call there cannot be
collected and :func:`transformation` names it in the error (flax.linen's lifted transformations
by their ``nn.`` names, from flax's frames on the stack; JAX's by its source files).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax.numpy as jnp
from jax.custom_batching import custom_vmap

# innermost JAX frame -> the transformation a user wrote (source files of jax._src)
_FRAMES = (
    ("control_flow/loops.py", "lax.scan / nn.scan / nnx.scan / a fori_loop or while_loop"),
    ("ad_checkpoint.py", "jax.checkpoint / nn.remat / nnx.remat"),
    ("control_flow/conditionals.py", "lax.cond / lax.switch"),
    ("custom_derivatives.py", "a jax.custom_vjp / custom_jvp function"),
    ("pjit.py", "a jax.jit nested in the loss"),
    ("interpreters/batching.py", "jax.vmap"),
    ("/ad.py", "a jax.grad / jax.jvp nested in the loss"),
)

# flax.linen's lifted transformations: the inner functions of flax/core/lift.py
_FLAX_LIFTS = {"scanned": "nn.scan", "rematted": "nn.remat", "jitted": "nn.jit",
               "mapped": "nn.vmap", "body_fn": "nn.while_loop / nn.fori_loop"}


def _trace_kind() -> str:
    try:  # private, read only to name the transformation; the stack below is the fallback
        from jax._src import core

        return type(core.trace_ctx.trace).__name__
    except Exception:  # pragma: no cover - a JAX without it
        return ""


def in_vmap() -> bool:
    """True when the innermost transformation being traced is ``jax.vmap``."""
    return _trace_kind() == "BatchTrace"


def transformation() -> str:
    """The nested transformation being traced, in the words a user wrote it: the first of
    `_FRAMES` whose JAX source file is on the stack (a scan's body may also be traced once by
    a jit inside flax; the enclosing train-step jit and the optimizer's grad are always there,
    hence the order)."""
    files = set()
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if name.endswith("flax/core/axes_scan.py"):
            return "nn.scan"
        if name.endswith("flax/core/lift.py") and frame.f_code.co_name in _FLAX_LIFTS:
            return _FLAX_LIFTS[frame.f_code.co_name]  # the innermost flax.linen transformation
        if "jax/_src/" in name:
            files.add(name)
        frame = frame.f_back  # type: ignore[assignment]
    for tail, what in _FRAMES:
        if any(f.endswith(tail) for f in files):
            return what
    return "a nested transformation (nn.scan, nn.remat, a nested jit, ...)"


def through_vmap(tag: Callable, x, z):
    """``tag(x_full, z_full)`` run in the trace enclosing the current ``jax.vmap``, with the
    batch axis first; returns the (perturbed) output, batched."""

    @custom_vmap
    def call(x, z):
        return z

    @call.def_vmap
    def rule(axis_size, in_batched, x, z):
        if not in_batched[0]:
            x = jnp.broadcast_to(x, (axis_size, *x.shape))
        if not in_batched[1]:
            z = jnp.broadcast_to(z, (axis_size, *z.shape))
        return tag(x, z), True

    return call(x, z)
