"""Activation checkpointing (`torch.utils.checkpoint`, transformers' gradient_checkpointing)
recomputes a block's forward inside the backward: the K-FAC hooks must count each call once.
Reference: the same run without checkpointing, step for step in float64, with the closure
and without it, reentrant and not (before, the non-reentrant recomputation added a second,
gradient-less copy of every input row, and the reentrant form's first forward under no_grad
did)."""

import grng_torch
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.torch._util import step_on

# the block's layers (d ≤ 17) take the refresh warm-up below 10·17 = 170 rows a step: B rows
# do, a double count (2B) would not, and the run would change (README "Defaults")
B = 100


class Net(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.mode is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h)


def _run(mode, closure_free, steps=22):
    torch.manual_seed(0)
    model = Net(mode).double()
    opt = grng_torch.RING(model.parameters(), model=model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):  # the warm-up (every step refreshes) and past it
        x = torch.randn(B, 6, dtype=torch.float64, generator=g)
        y = torch.randint(0, 3, (B,), generator=g)
        step_on(opt, model, x, y, closure_free)
    return model, opt


@pytest.mark.parametrize("closure_free", [False, True], ids=["closure", "closure_free"])
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_a_checkpointed_block_gives_the_steps_without_checkpointing(mode, closure_free):
    ref, _ = _run(None, closure_free)
    model, opt = _run(mode, closure_free)
    assert opt.describe().kfac_share == 1.0
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class AttentionNet(nn.Module):
    """A checkpointed self-attention block through `scaled_dot_product_attention` (whose fused
    kernels have no double backward) and a classifier head."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(6, 8)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def block(self, x):
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, 2, 4).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h.transpose(1, 2).reshape(b, t, 8)

    def forward(self, x):
        x = self.inp(x)
        h = self.block(x) if self.mode is None else \
            checkpoint(self.block, x, use_reentrant=self.mode == "reentrant")
        return self.head(h.mean(dim=1))


def _reng_run(mode, steps=3):
    torch.manual_seed(0)
    model = AttentionNet(mode)
    opt = grng_torch.RENG(model.parameters(), model=model)  # gr="double_backprop"
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 5, 6, generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        step_on(opt, model, x, y, closure_free=False)
    return model


def test_double_backprop_through_checkpointed_attention():
    """RENG's H·g differentiates the checkpointed block again: its recomputation must run the
    attention kernel the first pass ran (math), else torch's checkpoint sees other metadata
    (transformers' Llama / ViT with gradient_checkpointing_enable() crashed at the first
    step). use_reentrant=True cannot be differentiated twice: refused with the fix."""
    ref = _reng_run(None)
    got = _reng_run("non_reentrant")
    for a, b in zip(ref.parameters(), got.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="use_reentrant=False.*finite_difference"):
        _reng_run("reentrant", steps=1)
