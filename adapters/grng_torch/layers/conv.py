"""`nn.Conv1d` / `nn.Conv2d` (groups = 1, zero padding): a = unfolded input patches, s = output
gradients, one row per (example, output position); B is the example count (§2.1 "expand").
A Conv1d is unfolded as a Conv2d of height 1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def supported(m: nn.Module) -> str | None:
    """None when the convolution gets K-FAC, else why not."""
    if not isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return "no K-FAC helper for this convolution type (Conv1d and Conv2d have one)"
    if type(m).forward not in (nn.Conv1d.forward, nn.Conv2d.forward):
        return "its class overrides forward"
    if m.groups != 1:
        kind = "depthwise" if m.groups == m.in_channels else "grouped"
        return f"a {kind} convolution (groups={m.groups}): no K-FAC helper for groups > 1"
    if m.padding_mode != "zeros":
        return (f"padding_mode={m.padding_mode!r}: no K-FAC helper for padding other than "
                "zeros")
    return None


def _two_d(m: Any) -> bool:
    return isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))


def as_2d(m: Any):
    """(kernel, dilation, stride, padding) as 2-d tuples (a 1-d convolution's: height 1; also
    the transposed convolutions')."""
    if _two_d(m):
        return m.kernel_size, m.dilation, m.stride, m.padding
    pad = m.padding if isinstance(m.padding, str) else (0, m.padding[0])
    return (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0]), pad


def batched_2d(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A call's input or output gradient as (B, C, H, W): an unbatched one gains B = 1, a 1-d
    convolution's height 1."""
    spatial = 2 if _two_d(m) else 1
    if t.dim() == spatial + 1:
        t = t.unsqueeze(0)
    return t.unsqueeze(-2) if spatial == 1 else t


def _explicit_padding(kernel, dilation, padding) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) for 'valid' / 'same' (asymmetric allowed), else None."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    return None


def padded_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as (B, C, H, W) with the layer's zero padding applied (an unbatched input
    gains B = 1, a Conv1d's height 1)."""
    x = batched_2d(m, x)
    kernel, dilation, _, padding = as_2d(m)
    pad = _explicit_padding(kernel, dilation, padding)
    if pad is None:
        pad = (padding[1], padding[1], padding[0], padding[0])
    return F.pad(x, pad) if any(pad) else x


def geometry(m: nn.Module) -> tuple:
    """(kernel, dilation, stride) as 2-d tuples (a Conv1d's of height 1)."""
    return as_2d(m)[:3]


def input_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded patches, one row per (example, output position), columns (c, kh, kw): the
    transposed view of one d × (B·L) copy gathered from window views of the (padded) input
    (`F.unfold` then a transposing copy took 3–6x longer: two copies of B·L·d values)."""
    x = padded_input(m, x)
    (kh, kw), (dh, dw), (sh, sw) = geometry(m)
    win = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    win = win[..., ::dh, ::dw]  # (B, C, Ho, Wo, kh, kw)
    return win.permute(1, 4, 5, 0, 2, 3).reshape(x.shape[1] * kh * kw, -1).T


def batch_slices(m: nn.Module, x: torch.Tensor, max_bytes: int):
    """Consecutive slices of the batch, each with at most `max_bytes` of unfolded patches
    where one example's fit (the whole of an unbatched input): what a reduction of the patches
    (`grng_torch._layer_rows.kept_input`) takes one at a time."""
    if x.dim() == (2 if _two_d(m) else 1) + 1:  # unbatched
        yield x
        return
    kernel = as_2d(m)[0]
    per_example = x[:1].numel() * kernel[0] * kernel[1] * x.element_size()  # ≥ its rows
    step = max(1, max_bytes // max(per_example, 1))
    for start in range(0, x.shape[0], step):
        yield x[start:start + step]


def output_rows(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients, one row per (example, output position), columns the channels."""
    return rows_of_channels(batched_2d(m, g).flatten(2))


def rows_of_channels(t: torch.Tensor) -> torch.Tensor:
    """(B, d, L) → the (B·L) × d rows, row b·L + l, as the transposed view of one d × (B·L)
    copy: its inner runs are L contiguous values (a strided (B, L, d) copy of an unfold with
    L = 256 positions ran 4x slower), and BLAS reads the view through its transpose flag."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).T
