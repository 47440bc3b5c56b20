"""Module hooks that collect what the core's curvature structures need from a torch model.

- K-FAC rows of every `nn.Linear` and `nn.Conv2d` (groups=1, zero padding): the layer inputs
  a (n, d_in), without the ones column, and the output gradients s (n, d_out) with rows
  B * dL/dz. A convolution's inputs are its unfolded patches (`torch.nn.functional.unfold`),
  one row per (example, output position).
- The model's own inputs (the positional and keyword arguments of its forward call) and the
  autocast state they ran under, so the optimizer can re-run the model functionally
  (per-example gradients through `torch.func`, the "mc" Fisher's sampled-label pass).
- The targets given to the loss module, for per-example losses.

Nothing is collected unless the optimizer opened a collection (`Collector.collect`), so the
hooks cost one attribute check on ordinary forward passes (evaluation, other code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from grng_core.concrete import branchable
from grng_core.structures import factored


def unwrap(model: nn.Module) -> nn.Module:
    """The module DistributedDataParallel / DataParallel wrap (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class HookedLayer(NamedTuple):
    """A module the K-FAC structure can see: its kind, weight and bias parameters."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    weight: torch.Tensor
    bias: torch.Tensor | None


def _conv_supported(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros"


def find_layers(model: nn.Module) -> list[HookedLayer]:
    """The Linear and Conv2d modules of `model` (each weight at most once: tied weights and
    grouped or non-zero-padded convolutions are left to the diagonal structure)."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and \
                m.has_uninitialized_params():  # type: ignore[misc]
            continue
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            found.append(HookedLayer(name, m, "linear", m.weight, m.bias))
        elif (isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward
              and _conv_supported(m)):
            found.append(HookedLayer(name, m, "conv2d", m.weight, m.bias))
    counts: dict[int, int] = {}
    for L in found:
        for p in (L.weight, L.bias):
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
    return [L for L in found
            if counts[id(L.weight)] == 1 and (L.bias is None or counts[id(L.bias)] == 1)]


def _conv_padding(m: nn.Conv2d) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) zero padding of the input, or None for symmetric padding."""
    if m.padding == "valid":
        return (0, 0, 0, 0)
    if m.padding == "same":
        pads = []
        for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    return None


def conv_rows(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded patches of a Conv2d input, one row per (example, output position)."""
    if x.dim() == 3:  # unbatched input
        x = x.unsqueeze(0)
    pad = _conv_padding(m)
    padding: Any
    if pad is None:
        padding = m.padding
    else:
        x = F.pad(x, pad)
        padding = 0
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def factored_pays(layer: HookedLayer, x: torch.Tensor) -> bool:
    """Whether the core would precondition this call's layer in factored form (§2.1): rows it
    can branch on without a device sync, and fewer multiply-adds than the dense product."""
    if not branchable(x):
        return False
    d_out, d_in = layer.weight.shape[0], layer.weight[0].numel() + (layer.bias is not None)
    return factored.cheaper(d_out, d_in, x.numel() // max(x.shape[-1], 1))


def input_rows(layer: HookedLayer, x: torch.Tensor) -> torch.Tensor:
    if layer.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    return conv_rows(cast(nn.Conv2d, layer.module), x)


def output_rows(layer: HookedLayer, g: torch.Tensor) -> torch.Tensor:
    if layer.kind == "linear":
        return g.reshape(-1, g.shape[-1])
    if g.dim() == 3:
        g = g.unsqueeze(0)
    return g.movedim(1, -1).reshape(-1, g.shape[1])


@dataclass
class Batch:
    """The model's inputs on the optimizer's batch, and the loss module's targets."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    size: int | None = None  # B: the leading axis of the first tensor argument
    autocast: tuple = ()  # ((device_type, enabled, dtype), ...) at the forward call
    targets: Any = None
    has_targets: bool = False
    called: bool = False


def autocast_state() -> tuple:
    out = []
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        out.append((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
    return tuple(out)


@contextlib.contextmanager
def autocast_as(state: tuple) -> Iterator[None]:
    """Re-enter the autocast state recorded by `_autocast_state`."""
    with contextlib.ExitStack() as stack:
        for dev, enabled, dtype in state:
            stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
        yield


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Autocast disabled on every device (the core's math runs in its own dtypes)."""
    with autocast_as(tuple((dev, False, dtype) for dev, _, dtype in autocast_state())):
        yield


def _first_tensor(tree) -> torch.Tensor | None:
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


class Collector:
    """Hooks on one model (and optionally its loss module); inert until `collect` opens."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module | None = None):
        self.model = model
        self.root = unwrap(model)
        self.layers = find_layers(self.root)
        self.mode: str | None = None  # None | "backward" | "outputs"
        self.active: set[int] = set()
        self.capture = False
        self.batch = Batch()
        self.a: dict[int, list] = {}
        self.s: dict[int, list] = {}
        self.z: dict[int, list] = {}
        self.examples: dict[int, int] = {}  # per layer: examples over its collected calls
        self.rows_only: set[int] = set()  # layers collected only for the factored form
        self._handles = [self.root.register_forward_pre_hook(self._root_hook, with_kwargs=True)]
        for i, L in enumerate(self.layers):
            self._handles.append(L.module.register_forward_hook(self._layer_hook(i)))
        if loss_fn is not None:
            self._handles.append(loss_fn.register_forward_pre_hook(self._loss_hook,
                                                                   with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _root_hook(self, module, args, kwargs):
        if not self.capture:
            return None
        b = self.batch
        b.args, b.kwargs, b.called = tuple(args), dict(kwargs), True
        first = _first_tensor((args, kwargs))
        b.size = None if first is None or first.dim() == 0 else int(first.shape[0])
        b.autocast = autocast_state()
        return None

    def _loss_hook(self, module, args, kwargs):
        if not self.capture:
            return None
        if len(args) >= 2:
            target = args[1]
        elif "target" in kwargs:
            target = kwargs["target"]
        else:
            return None
        self.batch.targets = target.detach() if isinstance(target, torch.Tensor) else target
        self.batch.has_targets = True
        return None

    def _layer_hook(self, i: int):
        layer = self.layers[i]

        def hook(module, inputs, output):
            if self.mode is None or i not in self.active or not inputs:
                return None
            x = inputs[0]
            if i in self.rows_only and not factored_pays(layer, x):
                return None  # rows the core would not use: keep nothing
            n = self.batch.size if self.batch.size is not None else x.shape[0]
            self.a.setdefault(i, []).append(input_rows(layer, x.detach()))
            self.examples[i] = self.examples.get(i, 0) + n
            if self.mode == "outputs":
                self.z.setdefault(i, []).append(output)
            elif output.requires_grad:
                output.register_hook(self._grad_hook(i, n))
            return None

        return hook

    def _grad_hook(self, i: int, n: int):
        layer = self.layers[i]

        def hook(grad):
            if self.mode == "backward" and i in self.active:
                self.s.setdefault(i, []).append(output_rows(layer, grad.detach()) * n)
            return None

        return hook

    # -------------------------------------------------------------- sessions
    @contextlib.contextmanager
    def collect(self, mode: str | None, active=(), capture: bool = False,
                rows_only=()) -> Iterator[None]:
        """Collect K-FAC rows of the layers numbered in `active` ("backward": s from the
        backward pass through tensor hooks; "outputs": keep the outputs z for an explicit
        autograd.grad), and the model inputs / loss targets when `capture`."""
        old = (self.mode, self.active, self.capture, self.rows_only)
        self.mode, self.active, self.capture = mode, set(active), capture
        self.rows_only = set(rows_only)
        try:
            yield
        finally:
            self.mode, self.active, self.capture, self.rows_only = old

    def clear(self) -> None:
        self.a, self.s, self.z = {}, {}, {}
        self.examples = {}
        self.batch = Batch()

    def has_rows(self, i: int) -> bool:
        return bool(self.a.get(i)) and bool(self.s.get(i))

    def rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(a, s, B) of layer i, every forward call of the layer concatenated; B counts the
        examples of those calls (the rows are B·T for a convolution or a sequence)."""
        a, s = self.a.get(i), self.s.get(i)
        name = self.layers[i].name or type(self.layers[i].module).__name__
        if not a or not s:
            raise RuntimeError(
                f"no K-FAC statistics were collected for layer {name!r}: the closure must run "
                "the model's forward and call loss.backward() (and the layer must take part)")
        a_rows = a[0] if len(a) == 1 else torch.cat(a)
        s_rows = s[0] if len(s) == 1 else torch.cat(s[::-1])
        return a_rows, s_rows, self.examples[i]

    def scale(self) -> int:
        """B, the batch size the output gradients are multiplied by."""
        if self.batch.size is None:
            raise RuntimeError("the model's batch size is unknown: the closure did not call "
                               "the model given to the optimizer")
        return self.batch.size
