"""`nn.ConvTranspose1d` / `nn.ConvTranspose2d` (groups = 1), read as one linear map per input
position (§2.1, shared weights): each (example, input position) row a of the input's C_in
channels is multiplied by the weight (C_in, C_out, k...) read as a (C_in, C_out·k) matrix
(transposed, one input axis), and the windows it gives overlap-add into the output. s, the
gradient of that row's window, is the output gradient unfolded with the layer's kernel,
stride, padding and dilation, so that G = sᵀa/B exactly (the bias, one per output channel
added after the overlap, is not part of that map: it stays on the diagonal structure).
d_in = C_in, d_out = C_out·k: the large factor is S."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grng_torch.layers.conv import as_2d, batched_2d, rows_of_channels

TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def supported(m: nn.Module) -> str | None:
    """None when the transposed convolution gets K-FAC, else why not."""
    if not isinstance(m, TYPES) or type(m).forward not in tuple(t.forward for t in TYPES):
        return "its class overrides forward"
    if m.groups != 1:
        return f"a grouped transposed convolution (groups={m.groups}): no K-FAC helper"
    if any(op >= s for op, s in zip(m.output_padding, m.stride)):  # torch allows it where
        return (f"output_padding={m.output_padding} not below stride={m.stride}: output "  # the
                "positions no input position reaches (no K-FAC helper)")  # dilation is larger
    return None


def input_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One row per (example, input position), columns the input channels."""
    return rows_of_channels(batched_2d(m, x).flatten(2))


def output_rows(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """One row per (example, input position): the output gradient's window that position
    reaches, columns (c_out, k...) as the weight's trailing axes (with output_padding below
    the stride, the windows are exactly the input's positions)."""
    kernel, dilation, stride, padding = as_2d(m)
    cols = F.unfold(batched_2d(m, g), kernel, dilation=dilation, padding=padding,
                    stride=stride)
    return rows_of_channels(cols)
