"""describe() notes a K-FAC layer whose curvature is far below the damping (its step is then
about g/damping): ConvNeXt's blocks under a layer scale of 1e-6. The mean eigenvalue of A ⊗ S
is checked against a dense float64 eigendecomposition of the Kronecker product."""

from __future__ import annotations

import grng_torch as gt
import numpy as np
import torch
from torch import nn

from grng_core.describe import DOMINATED_BELOW


class Scaled(nn.Module):
    """A block whose output is multiplied by a small fixed scale, beside a plain head (a
    trained layer scale grows out of it within steps here: the diagonal's step g/(v + λ))."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.register_buffer("scale", torch.full((5,), 1e-6))  # fixed: stays tiny
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(x + self.scale * torch.tanh(self.block(x)))


def test_a_layer_under_a_tiny_scale_is_noted_and_the_plain_head_is_not():
    torch.manual_seed(0)
    model = Scaled().double()
    opt = gt.RING(model.parameters(), model=model)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    notes = {e.name: e.reason for e in opt.describe().entries if e.structure == "kfac"}
    damping = opt.param_groups[0]["damping"]
    for L in opt.group_state(0).core.curvature.kfac:
        A, S = L.A.numpy(), L.S.numpy()
        mean = np.linalg.eigvalsh(np.kron(A, S)).mean()  # the dense reference
        name = opt.param_names[id(opt.param_groups[0]["params"][L.layout.weight])]
        if name == "block.weight":
            assert mean < DOMINATED_BELOW * damping
            assert notes[name].startswith("damping-dominated") and f"{mean:.2g}" in notes[name]
            assert notes["block.bias"] == notes[name]
        else:
            assert mean > DOMINATED_BELOW * damping and notes[name] is None, (name, mean)
    assert "damping-dominated" in str(opt.describe())


def test_no_note_before_the_first_curvature_update():
    model = Scaled().double()
    opt = gt.RING(model.parameters(), model=model)
    assert all(e.reason is None for e in opt.describe().entries if e.structure == "kfac")
