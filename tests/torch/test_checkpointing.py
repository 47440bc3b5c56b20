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
