"""`nn.Linear` and transformers' `Conv1D` (GPT-2's projections): a = x, s = dL/dz, one row per
example and leading position (§2.1). Conv1D stores its weight (in, out): `transposed`."""

from __future__ import annotations

import torch
from torch import nn


def rows(_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def is_linear(m: nn.Module) -> bool:
    """A plain `nn.Linear` (or a subclass that keeps its forward)."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def is_hf_conv1d(m: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (recognised without importing transformers)."""
    t, w = type(m), getattr(m, "weight", None)
    return (t.__name__ == "Conv1D" and t.__module__.startswith("transformers")
            and isinstance(w, torch.Tensor) and w.dim() == 2)
