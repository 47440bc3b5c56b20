"""One hooked layer: its module, parameters, orientation and how its rows are read (§2.1)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HookedLayer:
    """A module the K-FAC structure sees.

    name: module path; kind: "linear" (one row per example or position: `nn.Linear`,
    transformers' `Conv1D`), "conv" (one row per (example, output position)) or
    "embedding" (one token id per row, `a_diagonal`) or "conv_transpose" (one row per
    (example, input position));
    transposed: the weight is stored (d_in, d_out), its first `in_axes` axes the input's
    (None: all but the last); inputs(module, x) -> a (n, d_in) and
    outputs(module, g) -> rows (n, d_out) of the output gradient; functional: the module
    applies the weight with `F.linear` itself (nn.MultiheadAttention's projections), so its
    calls are seen by a torch-function mode during collection, not by a module hook.
    """

    name: str
    module: nn.Module
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool
    inputs: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    outputs: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    functional: bool = False
    a_diagonal: bool = False  # an embedding: rows are token ids, A is diagonal (§2.1)
    in_axes: int | None = None

    @property
    def d_out(self) -> int:
        w = self.weight
        if not self.transposed:
            return w.shape[0]
        return w.shape[-1] if self.in_axes is None else math.prod(w.shape[self.in_axes:])

    @property
    def d_in(self) -> int:
        """Input width without the bias column."""
        return self.weight.numel() // self.d_out

    @property
    def trainable(self) -> bool:
        """Its weight or its bias requires a gradient (else it is frozen: no K-FAC)."""
        return self.weight.requires_grad or (self.bias is not None
                                             and self.bias.requires_grad)

    @property
    def label(self) -> str:
        return self.name or type(self.module).__name__

    def call_rows(self, x: torch.Tensor, output: torch.Tensor) -> int:
        """The rows one call gives: one per element of its output of width d_out, or (a
        transposed convolution) one per input position."""
        if self.kind == "conv_transpose":
            return x.numel() // max(self.d_in, 1)
        return output.numel() // max(self.d_out, 1)

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.inputs(self.module, x)

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        return self.outputs(self.module, g)
