"""K-FAC for `nn.ConvTranspose1d` / `2d` (`grng_torch.layers.conv_transpose`): one row per
(example, input position), the output gradient's unfolded windows as s (§2.1, shared weights).

References: autograd's weight gradient (G = aᵀs exactly, float64), and the same network
written as an `nn.Linear` on the input's positions followed by `F.fold` (the overlap-add),
which grng_torch hooks as a plain linear layer: every optimizer's steps must agree."""

from __future__ import annotations

import copy
import warnings

import grng_torch as gt
import pytest
import torch
import torch.nn.functional as F
from grng_torch.layers import conv_transpose
from torch import nn

from tests.torch._util import closure_for

CASES = [
    (nn.ConvTranspose2d, dict(kernel_size=3, stride=2, padding=1, output_padding=1), (4, 3, 5, 6)),
    (nn.ConvTranspose2d, dict(kernel_size=4, stride=2, padding=1, dilation=2), (4, 3, 5, 5)),
    (nn.ConvTranspose2d, dict(kernel_size=(2, 3), stride=(1, 2), padding=(0, 1)), (3, 5, 6)),
    (nn.ConvTranspose1d, dict(kernel_size=3, stride=3, padding=2), (4, 3, 7)),
]


@pytest.mark.parametrize("cls, kw, shape", CASES, ids=["2d-output-padding", "2d-dilated",
                                                      "2d-unbatched", "1d"])
def test_rows_give_the_weight_gradient(cls, kw, shape):
    """Σ_rows aᵀs is autograd's weight gradient read as (C_in, C_out·k)."""
    torch.manual_seed(0)
    m = cls(3, 5, **kw).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    a, s = conv_transpose.input_rows(m, x), conv_transpose.output_rows(m, g)
    assert a.shape[0] == s.shape[0] == x.numel() // 3
    torch.testing.assert_close(a.T @ s, m.weight.grad.reshape(3, -1), rtol=1e-12, atol=1e-13)


class LinearFold(nn.Module):
    """`ct` as a Linear over the input's positions (weight (C_out·k², C_in)) and F.fold."""

    def __init__(self, ct: nn.ConvTranspose2d, out_hw):
        super().__init__()
        self.ct_args = dict(kernel_size=ct.kernel_size, dilation=ct.dilation,
                            padding=ct.padding, stride=ct.stride)
        self.out_hw = out_hw
        self.lin = nn.Linear(ct.in_channels, ct.weight[0].numel(), bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(ct.weight.reshape(ct.in_channels, -1).T)
        self.bias = nn.Parameter(ct.bias.detach().clone())

    def forward(self, x):
        B, _, H, W = x.shape
        cols = self.lin(x.permute(0, 2, 3, 1)).reshape(B, H * W, -1).transpose(1, 2)
        return F.fold(cols, self.out_hw, **self.ct_args) + self.bias[None, :, None, None]


def _nets():
    torch.manual_seed(1)
    ct = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
    head = nn.Conv2d(4, 2, 3)
    direct = nn.Sequential(ct, nn.Tanh(), head).double()
    folded = nn.Sequential(LinearFold(ct, (8, 10)), nn.Tanh(), nn.Conv2d(4, 2, 3)).double()
    folded[2].load_state_dict(head.state_dict())
    return direct, folded


@pytest.mark.parametrize("cls, kw", [(gt.RING, {}), (gt.RING, dict(form="gauss_newton")),
                                     (gt.RENG, dict(gr="finite_difference")), (gt.RKalman, {})],
                         ids=["ring", "ring-gn", "reng-fd", "rkalman"])
def test_steps_equal_the_linear_and_fold_network(cls, kw):
    torch.manual_seed(2)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    target = torch.randn(6, 2, 6, 8, dtype=torch.float64)
    out = []
    for model in _nets():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # its gradient is explained by its rows, no warning
            opt = cls(model.parameters(), model=model, **kw)
            for _ in range(4):
                opt.step(_closure(opt, model, x, target))
        out.append((model, opt))
    (direct, d_opt), (folded, f_opt) = out
    torch.testing.assert_close(direct[0].weight.reshape(3, -1).T, folded[0].lin.weight,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(direct[0].bias, folded[0].bias, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(direct[2].weight, folded[2].weight, rtol=1e-9, atol=1e-12)
    assert not torch.equal(direct[0].weight, _nets()[0][0].weight)  # it moved
    by = {e.name: e for e in d_opt.describe().entries}
    assert by["0.weight"].structure == "kfac" and by["0.weight"].layer == "0"
    assert by["0.bias"].structure == "diagonal" and "windows overlap" in by["0.bias"].reason


def _closure(opt, model, x, target):
    return closure_for(opt, model, F.mse_loss, x, target)


def test_checkpoint_resumes_the_run():
    """state_dict after 2 steps, loaded into a fresh optimizer and model: 2 more steps equal
    the uninterrupted run's."""
    torch.manual_seed(2)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    target = torch.randn(6, 2, 6, 8, dtype=torch.float64)
    whole, _ = _nets()
    opt = gt.RING(whole.parameters(), model=whole)
    for step in range(4):
        if step == 2:
            saved_model, saved_opt = copy.deepcopy(whole.state_dict()), opt.state_dict()
        opt.step(_closure(opt, whole, x, target))
    resumed, _ = _nets()
    resumed.load_state_dict(saved_model)
    opt2 = gt.RING(resumed.parameters(), model=resumed)
    opt2.load_state_dict(saved_opt)
    for _ in range(2):
        opt2.step(_closure(opt2, resumed, x, target))
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("module, words", [
    (nn.ConvTranspose2d(4, 4, 3, groups=2), "groups=2"),
    # torch allows output_padding up to max(stride, dilation) - 1: output positions no input
    # reaches, more windows than input positions (it raised "inputs have 200 rows,
    # output_grads 288" on the first step)
    (nn.ConvTranspose2d(4, 4, 3, stride=1, dilation=2, output_padding=1), "output_padding"),
], ids=["grouped", "output-padding-at-the-stride"])
def test_an_uncovered_transposed_convolution_stays_diagonal_with_its_reason(module, words):
    model = nn.Sequential(module, nn.Flatten())
    with pytest.warns(UserWarning, match=words):
        opt = gt.RING(model.parameters(), model=model, kl_clip=None)
    x = torch.randn(2, 4, 5, 5)
    opt.step(_closure(opt, model, x, torch.zeros_like(model(x))))
    (e,) = [e for e in opt.describe().entries if e.name == "0.weight"]
    assert e.structure == "diagonal" and words in e.reason
