"""equinox layers the K-FAC collection hooks (`grng_jax._patch`): ``nn.Linear`` and ``nn.Conv``
(``Conv1d``/``Conv2d``/``Conv3d``). Their weights are stored output axis first, (out, in) and
(out, in, *kernel_size) (tagged ``transposed=False``), and they are called on one example,
usually under ``jax.vmap`` (collected with the whole batch, `grng_jax._nested`). A convolution's
rows are its patches, ordered (c_in, *kernel) as the weight flattens, and its channels-first
output is tagged channels last. Grouped convolutions and non-zero padding modes are left
untagged (another use of the weight). ``nn.BatchNorm`` in training mode is recorded as coupling
the batch's examples (refused where per-example gradients are needed)."""

from __future__ import annotations

import jax.numpy as jnp

from grng_jax._patches import patches
from grng_jax._uncovered import uncovered


def _linear(col, mod, x, out):
    rows = jnp.reshape(x, (-1,))  # in_features="scalar": x of shape ()
    z = col.tag(rows, mod.weight, mod.bias, jnp.reshape(out, (-1,)), "dense", 1,
                transposed=False)
    return jnp.reshape(z, jnp.shape(out))


def _conv(col, mod, x, out):
    n = mod.num_spatial_dims
    why = (f"groups={mod.groups} (grouped or depthwise)" if mod.groups != 1 else
           f"padding_mode={mod.padding_mode!r}" if mod.padding_mode != "ZEROS" else
           f"{n} spatial axes" if n > 3 else
           f"an input of {x.ndim} axes (K-FAC takes (channels, *spatial) per example)"
           if x.ndim != n + 1 else None)
    if why is not None:
        col.used_otherwise(mod.weight, uncovered("eqx.nn.Conv", why))
        return out
    rows = patches(jnp.moveaxis(x, 0, -1)[None], tuple(mod.kernel_size), tuple(mod.stride),
                   mod.padding, tuple(mod.dilation), channel_major=True)[0]
    z = col.tag(rows, mod.weight, mod.bias, jnp.moveaxis(out, 0, -1), "conv", n + 1,
                transposed=False)
    return jnp.moveaxis(z, -1, 0)


def _batch_norm(col, mod, args, kwargs, out):
    """A BatchNorm in training mode (the call's `inference`, else the module's) averages over
    the vmapped batch: its examples are coupled (`_optax._refuse_batch_coupled`)."""
    inference = kwargs.get("inference")
    if not (mod.inference if inference is None else inference):
        col.batch_coupled.append(f"an eqx.nn.BatchNorm({mod.input_size})")
    return out


def install() -> None:
    import equinox as eqx

    from grng_jax._patch import hook_method

    hook_method(eqx.nn.Linear, "__call__", _linear)
    hook_method(eqx.nn.Conv, "__call__", _conv)
    hook_method(eqx.nn.BatchNorm, "__call__", _batch_norm, with_call=True)
