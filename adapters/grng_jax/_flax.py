"""flax.linen layers the K-FAC collection intercepts (`flax.linen.intercept_methods`), one
helper per type: Dense, DenseGeneral (also the projections inside MultiHeadDotProductAttention),
Conv (unfolded patches, any number of spatial dims) and Embed (token ids, A diagonal, §2.1).
Each returns the rows' source, the kind and the kernel's input-axis count for `Collector.tag`;
a configuration it does not cover (batch_dims, circular padding, input dilation, grouped
convolutions, masks) returns None and the call stays untagged (its leaves: the diagonal).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from grng_jax._patches import patches


def _axes(axis, ndim: int) -> tuple[int, ...]:
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axis)


def dense_general(mod, x) -> tuple[Any, str, int] | str:
    """DenseGeneral: the contracted axes moved last (rows of d_in = their product); or why
    the call's configuration is not covered."""
    if getattr(mod, "batch_dims", ()):
        return f"batch_dims={mod.batch_dims}"
    return dense_general_rows(x, _axes(mod.axis, x.ndim))


def dense_general_rows(x, axes: tuple[int, ...]) -> tuple[Any, str, int]:
    """The input with its contracted `axes` moved last, in order."""
    rows = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    return rows, "dense", len(axes)


def conv(mod, x) -> tuple[Any, str, int] | str:
    """Conv: patches (B, *out_spatial, prod(kernel_size)·c_in), ordered as the kernel
    (*kernel_size, c_in, c_out) flattens; or why the call's configuration is not covered."""
    from flax.linen.linear import canonicalize_padding

    ks = tuple(mod.kernel_size)
    n = len(ks)
    if mod.feature_group_count != 1:
        return f"feature_group_count={mod.feature_group_count} (grouped or depthwise)"
    if mod.mask is not None:
        return "a kernel mask"
    if x.ndim != n + 2:
        return f"an input of {x.ndim} axes (K-FAC takes (batch, *spatial, features))"

    def tup(v):
        return (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))

    if any(d != 1 for d in tup(mod.input_dilation)):
        return f"input_dilation={mod.input_dilation}"
    padding = canonicalize_padding(mod.padding, n)
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return f"padding={padding!r}"  # CIRCULAR / CAUSAL pad outside the convolution
    spatial = "DHW"[-n:] if n <= 3 else None
    if spatial is None:
        return f"{n} spatial axes"
    rows = patches(x, ks, tup(mod.strides), padding, tup(mod.kernel_dilation),
                   channel_major=False)
    return rows, "conv", n + 1


def embed(mod, ids) -> tuple[Any, str, int] | str:
    """Embed: the token ids (one-hot rows, A diagonal); or why not (non-integer input)."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        return f"{ids.dtype} inputs (not token ids)"
    return ids, "embed", 1


def kernel_of(mod) -> tuple[str, Any] | None:
    """(kind of helper, the layer's own weight variable name) for a covered module type."""
    import flax.linen as nn

    if isinstance(mod, nn.Dense):
        return "dense", "kernel"
    if isinstance(mod, nn.DenseGeneral):
        return "dense_general", "kernel"
    if isinstance(mod, nn.Conv):
        return "conv", "kernel"
    if isinstance(mod, nn.Embed):
        return "embed", "embedding"
    return None


def rows_of(helper: str, mod, x):
    if helper == "dense":
        return x, "dense", 1
    if helper == "dense_general":
        return dense_general(mod, x)
    if helper == "conv":
        return conv(mod, x)
    return embed(mod, x)


def batch_norm_training(mod, args=(), kwargs=None) -> bool:
    """A flax (linen or nnx) BatchNorm called in training mode: its output for one example
    depends on the batch's others (its use_running_average, the call's argument first)."""
    cls = type(mod)
    if cls.__name__ != "BatchNorm" or not cls.__module__.startswith("flax."):
        return False
    kwargs = kwargs or {}
    use = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if use is None:
        use = getattr(mod, "use_running_average", None)
    return not use
