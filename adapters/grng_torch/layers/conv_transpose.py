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

from grng_torch.layers.conv import rows_of_channels

TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def supported(m: nn.Module) -> str | None:
    """None when the transposed convolution gets K-FAC, else why not."""
    if type(m).forward not in tuple(t.forward for t in TYPES):
        return "its class overrides forward"
    if m.groups != 1:
        return f"a grouped transposed convolution (groups={m.groups}): no K-FAC helper"
    return None


def _batched_2d(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """t as (B, C, H, W): an unbatched call gains B = 1, a 1-d one height 1."""
    spatial = 2 if isinstance(m, nn.ConvTranspose2d) else 1
    if t.dim() == spatial + 1:
        t = t.unsqueeze(0)
    return t.unsqueeze(-2) if spatial == 1 else t


def input_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One row per (example, input position), columns the input channels."""
    return rows_of_channels(_batched_2d(m, x).flatten(2))


def output_rows(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """One row per (example, input position): the output gradient's window that position
    reaches, columns (c_out, k...) as the weight's trailing axes."""
    assert isinstance(m, TYPES)
    two_d = isinstance(m, nn.ConvTranspose2d)

    def pair(v, fill: int) -> tuple[int, int]:
        return (int(v[0]), int(v[1])) if two_d else (fill, int(v[0]))
    cols = F.unfold(_batched_2d(m, g), pair(m.kernel_size, 1), dilation=pair(m.dilation, 1),
                    padding=pair(m.padding, 0), stride=pair(m.stride, 1))
    return rows_of_channels(cols)


