"""Dense layers that expose their inputs and output gradients (K-FAC statistics in JAX).

JAX computes no side results: a layer's output gradient dL/dz is obtained with the perturbation
trick. While the optimizer collects statistics it runs the loss once more with a zero array p_k
added to the output of every tagged dense layer k (z_k + p_k); the gradient of the loss with
respect to p_k is dL/dz_k, and the layer inputs a_k are returned beside the loss. Outside that
pass (training, evaluation, per-example gradients, oracles) a tagged layer is a plain
``x @ kernel + bias``.

A layer is tagged by calling it through :func:`dense` (plain ``jax.numpy`` models) or by using
a layer of a covered library (intercepted automatically, no model change): flax.linen's Dense,
DenseGeneral, Conv and Embed (`grng_jax._flax`), flax.nnx's Linear, LinearGeneral, Conv and
Embed (`grng_jax._nnx`), equinox's nn.Linear and nn.Conv (`grng_jax._equinox`). The weight is
recognised by identity: ``kernel`` (and ``bias``) must be the leaves of the params pytree
handed to the optimizer, not arrays computed from them (no cast, no transpose). A call inside
``jax.vmap`` is collected with the whole batch; one inside another nested transformation of
the loss (``scan``, ``remat``, a nested ``jit``) cannot be (`grng_jax._nested`). A call that
does not qualify is left untagged: its leaves are preconditioned by the diagonal unless the
layer was registered for K-FAC, in which case the update raises a ValueError saying why (with
the transformation's name) and how to fix it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grng_jax import _nested
from grng_jax._active import ACTIVE
from grng_jax._uncovered import NESTED_USE, UNCOVERED, uncovered

try:  # an explicit import: `jax.extend` is not an attribute of `jax` until imported
    from jax.extend.core import get_opaque_trace_state as _opaque_trace_state
except ImportError:  # pragma: no cover - older JAX without it: the check is skipped
    _opaque_trace_state = None  # type: ignore[assignment]



def _trace_state():
    if _opaque_trace_state is None:  # pragma: no cover
        return None
    try:
        return _opaque_trace_state(convention="grng_jax")
    except Exception:  # pragma: no cover - a JAX whose trace state cannot be read
        return None


class Call(NamedTuple):
    """One tagged layer call: params leaf indices, its input rows' source and output avals.

    inputs: what the K-FAC rows are read from (a tracer of the collecting pass): the input
        with the contracted axes last (dense), the unfolded patches (conv) or the token ids
        (embed). in_axes: how many leading kernel axes index the input (§2.1, LayerSpec).
    """

    weight: int
    bias: int | None
    inputs: Any
    out_shape: tuple
    out_dtype: Any
    kind: str = "dense"  # "dense" | "conv" | "embed"
    in_axes: int = 1
    transposed: bool = True  # Flax layout (input axes first); False: equinox's (out, in...)
    # a bias that is not one of the optimizer's leaves (one another transformation of an
    # optax.multi_transform updates, or one computed from a leaf): `bias` is then None, as
    # the kernel's K-FAC block, without a bias column, does not depend on how it is added
    foreign_bias: bool = False


class Lifted(NamedTuple):
    """A covered layer called inside a transformation that lifts its parameters (nn.scan,
    nnx.scan, remat): its module path where the hook knows it (flax.linen's), else "", its
    kind, and its kernel's shape there (`grng_jax._layers.lifted_modules` names it by that)."""

    name: str
    kind: str
    shape: tuple


class Collector:
    """Records tagged dense calls while the loss runs (see the module docstring).

    leaves: the params leaves exactly as the loss receives them (identity is the registry).
    perturbs: None to only record the calls (shape discovery), else one zero array per
        recorded call in order, added to the layer output.
    """

    def __init__(self, leaves, perturbs=None):
        self.ids = {id(x): i for i, x in enumerate(leaves)}
        self.perturbs = perturbs
        self.calls: list[Call] = []
        self.other_uses: dict[int, str] = {}  # leaf index -> an untagged use (tied, config)
        self.nested: dict[str, list[Lifted]] = {}  # transformation -> layers called inside
        # layers that mix the examples of a batch (BatchNorm in training mode): per-example
        # gradients of one-example batches would not be this loss's
        self.batch_coupled: list[str] = []
        self._trace = None
        self._token = None

    def __enter__(self):
        self._trace = _trace_state()
        self._token = ACTIVE.set(self)
        return self

    def __exit__(self, *exc):
        if self._token is not None:
            ACTIVE.reset(self._token)
        return False

    def _nested_elsewhere(self) -> bool:
        """Inside a nested transformation of the loss other than jax.vmap."""
        return (self._trace is not None and _trace_state() != self._trace
                and not _nested.in_vmap())

    def used_otherwise(self, kernel, how: str) -> None:  # `how`: see also `uncovered`
        """A registered leaf used by something other than a tagged call (Embed.attend: a tied
        output layer; an uncovered layer configuration): its K-FAC rows would miss that use."""
        w = self.ids.get(id(kernel))
        if w is not None:
            self.other_uses.setdefault(w, how)

    def tag(self, x, kernel, bias, z, kind: str = "dense", in_axes: int = 1,
            transposed: bool = True, name: str = ""):
        """Record one call (x: the rows' source, see `Call`; z: the output, its last axis the
        layer's output features) and return z (+ its perturbation in the collecting pass); an
        untagged call returns z unchanged. Under ``jax.vmap`` the call is recorded with the
        whole batch (`grng_jax._nested`). name: the layer's module path, for messages."""
        w = self.ids.get(id(kernel))
        if w is None and self._nested_elsewhere():  # e.g. nn.scan / nn.remat lift the params
            self.nested.setdefault(_nested.transformation(), []).append(
                Lifted(name, kind, tuple(getattr(kernel, "shape", ()))))
        if w is None or getattr(kernel, "ndim", 0) < 2:
            return z
        b = None if bias is None else self.ids.get(id(bias))
        foreign = bias is not None and b is None
        if self._trace is not None and _trace_state() != self._trace:
            if _nested.in_vmap():
                return _nested.through_vmap(
                    lambda x, z: self.tag(x, kernel, bias, z, kind, in_axes, transposed), x, z)
            self.other_uses.setdefault(w, f"{NESTED_USE}{_nested.transformation()}")
            return z  # inside a nested transformation of the loss: untagged
        k = len(self.calls)
        self.calls.append(Call(w, b, x, tuple(z.shape), z.dtype, kind, in_axes, transposed,
                               foreign))
        if self.perturbs is not None:
            if k >= len(self.perturbs):
                raise RuntimeError(
                    "grng_jax: the loss called more tagged dense layers while collecting "
                    "statistics than while its shapes were traced; the model must call the "
                    "same layers in the same order on every evaluation")
            if kind == "conv":
                z = conv_by_rows(x, kernel, z, transposed)
            z = z + self.perturbs[k].astype(z.dtype)
        return z


def conv_by_rows(rows, kernel, z, transposed: bool):
    """A convolution's output z, whose gradient flows through rows @ W (its patches times the
    kernel as a matrix) instead of the convolution's own transpose: the same value and the
    same input gradient (the matmul's, then the patches' gather transposed). Used in the
    statistics pass only, which runs inside grng_jax's refresh ``lax.switch``: there XLA:CPU
    runs a convolution's input gradient about 7x slower than the matmul and the scatter
    (`python -m benchmarks.xla_cond_conv`). No parameter gradient is taken in that pass (z's
    own is stopped), so only the inputs' gradient matters."""
    w = (kernel.reshape(-1, kernel.shape[-1]) if transposed
         else kernel.reshape(kernel.shape[0], -1).T)
    y = jnp.matmul(rows, w.astype(rows.dtype)).astype(z.dtype)
    return jax.lax.stop_gradient(z) + (y - jax.lax.stop_gradient(y))


def dense(x, kernel, bias=None, *, precision=None):
    """``x @ kernel + bias`` (kernel of shape (d_in, d_out), Flax layout), tagged for K-FAC.

    Use it for the dense layers of a plain ``jax.numpy`` model: the GRNG optimizers then
    collect the layer's inputs and output gradients on curvature steps. Inputs may have any
    leading axes (batch, sequence positions); every row counts as one K-FAC sample.
    """
    z = jnp.matmul(x, kernel, precision=precision)
    if bias is not None:
        z = z + bias
    col = ACTIVE.get()
    if col is not None:
        z = col.tag(x, kernel, bias, z)
    return z


def init_dense(key, d_in: int, d_out: int, *, bias: bool = True, dtype=jnp.float32,
               scale: float = 1.0) -> dict:
    """Params of one dense layer: ``{"kernel": (d_in, d_out), "bias": (d_out,)}``.

    kernel ~ N(0, scale²/d_in) (LeCun normal), bias = 0. The ``kernel``/``bias`` names are what
    ``layers="auto"`` looks for when the optimizer state is built.
    """
    w = jax.random.normal(key, (d_in, d_out), dtype) * jnp.asarray(scale / d_in**0.5, dtype)
    out = {"kernel": w}
    if bias:
        out["bias"] = jnp.zeros((d_out,), dtype)
    return out


def _path(mod) -> str:
    return "/".join(str(k) for k in getattr(mod, "path", ()) or ())


def _flax_interceptor(col: Collector):
    from grng_jax import _flax

    def interceptor(next_fun, args, kwargs, context):
        before = len(col.calls)
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and _flax.batch_norm_training(mod, args, kwargs):
            col.batch_coupled.append(f"flax.linen BatchNorm {_path(mod)!r}")
            return out
        found = _flax.kernel_of(mod)
        if found is None and context.method_name == "__call__" and \
                mod.has_variable("params", "kernel"):  # ConvTranspose, Einsum, a custom layer
            _untagged_kernel(col, mod, before)
        if found is None or not args:
            return out
        helper, name = found
        if context.method_name == "attend" and helper == "embed":
            col.used_otherwise(mod.get_variable("params", name), "Embed.attend")
            return out
        if context.method_name != "__call__" or not mod.has_variable("params", name):
            return out
        got = _flax.rows_of(helper, mod, args[0])
        kernel: Any = mod.get_variable("params", name)
        if isinstance(got, str):
            col.used_otherwise(kernel, uncovered(f"flax.linen {type(mod).__name__}", got))
            return out
        rows, kind, in_axes = got
        bias = mod.get_variable("params", "bias") if mod.has_variable("params", "bias") \
            else None
        return col.tag(rows, kernel, bias, out, kind, in_axes, name=_path(mod))

    return interceptor


def _untagged_kernel(col: Collector, mod, before: int) -> None:
    """A flax.linen module of another type than the covered ones, with a ``kernel`` that its
    call tagged nowhere (its calls since `before`: a custom layer's `dense` is read):
    ConvTranspose, Einsum, a custom layer's own matmul. Its rows are not read."""
    kernel = mod.get_variable("params", "kernel")
    w = col.ids.get(id(kernel))
    if w is None or any(c.weight == w for c in col.calls[before:]):
        return
    col.used_otherwise(kernel, UNCOVERED + (
        f"flax.linen {type(mod).__name__} (a layer type whose rows grng_jax does not read; "
        "inside a custom layer, call grng_jax.dense(x, kernel, bias))"))


@contextlib.contextmanager
def collecting(col: Collector):
    """Activate `col` for :func:`dense` and the layers of the covered libraries that are
    loaded (flax.linen through its method interceptor, flax.nnx and equinox through hooks)."""
    if "flax.nnx" in sys.modules:
        from grng_jax import _nnx

        _nnx.install()
    if "equinox" in sys.modules:
        from grng_jax import _equinox

        _equinox.install()
    with col, contextlib.ExitStack() as stack:
        if "flax.linen" in sys.modules:
            import flax.linen as nn

            stack.enter_context(nn.intercept_methods(_flax_interceptor(col)))
        yield col
