"""K-FAC for the layer types grng_torch hooks, each against a dense float64 reference of
ALGORITHMS.md §2.1 with the shared-weight scale ("expand"): for a layer applied at T
positions per example (a sequence's tokens, a convolution's output positions),
A = Σ_{b,t} ã ãᵀ / (B·T) from explicitly built input patches (loops, no unfold) and
S = Σ_{b,t} g gᵀ / B with g = ∂ℓ_b/∂z_{b,t}, the per-example loss's output gradient."""

from __future__ import annotations

import itertools

import grng_torch as gt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

B, CLASSES = 4, 3


def _patches_2d(x, kh, kw, stride, pad, dil):
    """Rows (B·T, C·kh·kw) of input patches, built position by position."""
    x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    Bn, C, H, W = x.shape
    oh = (H - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (W - dil[1] * (kw - 1) - 1) // stride[1] + 1
    rows = []
    for b in range(Bn):
        for i, j in itertools.product(range(oh), range(ow)):
            patch = torch.stack([x[b, :, i * stride[0] + u * dil[0], j * stride[1] + v * dil[1]]
                                 for u in range(kh) for v in range(kw)], dim=1)  # (C, kh·kw)
            rows.append(patch.reshape(-1))
    return torch.stack(rows)


def _reference(layer, x, input_rows, out_rows, bias=True):
    """(A, S) of `layer` inside layer -> flatten -> Linear head, per-example CE losses."""
    torch.manual_seed(3)
    z = layer(x)
    head = nn.Linear(z[0].numel(), CLASSES).double()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    losses = F.cross_entropy(head(z.reshape(x.shape[0], -1)), y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), z)  # ∂ℓ_b/∂z_b (ℓ_b depends on z_b only)
    a = input_rows(x)
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    s = out_rows(g)
    return a.T @ a / a.shape[0], s.T @ s / x.shape[0], head, y


def _grng_factors(layer, head, x, y):
    model = nn.Sequential(layer, nn.Flatten(), head)
    opt = gt.RING(model.parameters(), model=model, lr=0.0, damping=1e-2)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    first = opt.group_state(0).core.curvature.kfac[0]
    return first.A, first.S, opt


def _three_steps(model, name, x, y, **kw):
    """Three steps of grng_torch.<name> on (x, y); returns the optimizer."""
    opt = getattr(gt, name)(model.parameters(), model=model, lr=0.1, damping=1e-2, **kw)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return opt


CONV2D = [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=(2, 3), stride=2, padding=0),
          dict(kernel_size=3, stride=1, padding="same", dilation=2)]


@pytest.mark.parametrize("kw", CONV2D, ids=["pad1", "stride2", "same-dil2"])
def test_conv2d_factors_follow_the_expand_formula(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **kw).double()
    x = torch.randn(B, 2, 6, 7, dtype=torch.float64)
    k = conv.kernel_size
    pad = conv.padding if not isinstance(conv.padding, str) else tuple(
        conv.dilation[i] * (k[i] - 1) // 2 for i in range(2))
    A, S, head, y = _reference(
        conv, x, lambda x: _patches_2d(x, *k, conv.stride, pad, conv.dilation),
        lambda g: g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]))
    A_g, S_g, _ = _grng_factors(conv, head, x, y)
    assert torch.allclose(A_g, A, rtol=1e-10, atol=1e-13)
    assert torch.allclose(S_g, S, rtol=1e-10, atol=1e-13)


def test_conv1d_factors_follow_the_expand_formula():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, kernel_size=3, stride=2, padding=1, dilation=1).double()
    x = torch.randn(B, 3, 9, dtype=torch.float64)
    A, S, head, y = _reference(
        conv, x, lambda x: _patches_2d(x.unsqueeze(2), 1, 3, (1, 2), (0, 1), (1, 1)),
        lambda g: g.permute(0, 2, 1).reshape(-1, g.shape[1]))
    A_g, S_g, _ = _grng_factors(conv, head, x, y)
    assert torch.allclose(A_g, A, rtol=1e-10, atol=1e-13)
    assert torch.allclose(S_g, S, rtol=1e-10, atol=1e-13)


ROW_CASES = [
    (nn.Conv2d(3, 2, 3, padding=1), (5, 3, 7, 6)),
    (nn.Conv2d(3, 2, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (2, 3, 9, 8)),
    (nn.Conv2d(2, 2, 4, padding="same", dilation=2), (3, 2, 9, 9)),  # asymmetric padding
    (nn.Conv2d(2, 2, 3, stride=3), (2, 2, 10, 11)),  # positions left over at the edge
    (nn.Conv2d(2, 2, 3, padding=1), (2, 2, 5, 5)),  # unbatched below
    (nn.Conv1d(3, 2, 4, stride=2, padding=2, dilation=2), (4, 3, 13)),
    (nn.Conv1d(3, 2, 2, padding="same"), (3, 13)),  # unbatched Conv1d
]


@pytest.mark.parametrize("conv, shape", ROW_CASES, ids=[f"case{i}" for i in range(7)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_conv_input_rows_equal_unfold(conv, shape, layout):
    """The rows gathered from window views are F.unfold's patches exactly (a gather, no
    arithmetic), in the row order (example, position) and column order (c, kh, kw), whatever
    the input's memory layout."""
    from grng_torch.layers import conv as conv_rows

    torch.manual_seed(0)
    x = torch.randn(*shape)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    xb = x if x.dim() == (4 if isinstance(conv, nn.Conv2d) else 3) else x.unsqueeze(0)
    x2 = xb if isinstance(conv, nn.Conv2d) else xb.unsqueeze(2)
    k, d, s, _ = conv_rows.as_2d(conv)
    pad = conv_rows._explicit_padding(k, d, conv.padding)
    if pad is None:
        p = conv.padding if isinstance(conv, nn.Conv2d) else (0, conv.padding[0])
        pad = (p[1], p[1], p[0], p[0])
    cols = F.unfold(F.pad(x2, pad), k, dilation=d, stride=s)  # (B, d, L)
    expected = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    rows = conv_rows.input_rows(conv, x)
    assert rows.shape == expected.shape
    assert torch.equal(rows, expected)
    assert rows.shape[0] == conv(xb).numel() // conv.out_channels  # (example, position)


def test_linear_over_positions_follows_the_expand_formula():
    """nn.Linear on (B, T1, T2, d): one row per position, S scaled by the B examples."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    x = torch.randn(B, 3, 2, 5, dtype=torch.float64)
    A, S, head, y = _reference(lin, x, lambda x: x.reshape(-1, 5),
                               lambda g: g.reshape(-1, 4))
    A_g, S_g, _ = _grng_factors(lin, head, x, y)
    assert torch.allclose(A_g, A, rtol=1e-10, atol=1e-13)
    assert torch.allclose(S_g, S, rtol=1e-10, atol=1e-13)
    T = 6  # the dense-rows scale sᵀs/(B·T) would be T times smaller: the test can tell
    assert not torch.allclose(S_g, S / T, rtol=1e-3)


@pytest.mark.parametrize("name", ["RING", "RENG", "RKalman"])
def test_transformers_conv1d_steps_as_the_transposed_linear(name):
    """GPT-2's Conv1D (weight stored (in, out)) gets K-FAC: its steps are those of an
    nn.Linear holding the transposed weight, over (B, T, d) inputs."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    conv = pytorch_utils.Conv1D(6, 5).double()  # nf=6 outputs, nx=5 inputs
    lin = nn.Linear(5, 6).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    w0 = lin.weight.detach().clone()
    x = torch.randn(B, 7, 5, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (B,))
    for layer in (conv, lin):
        torch.manual_seed(1)
        model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(42, CLASSES)).double()
        assert _three_steps(model, name, x, y).describe().entries[0].structure == "kfac"
    assert torch.allclose(conv.weight.T, lin.weight, rtol=1e-10, atol=1e-12)
    assert torch.allclose(conv.bias, lin.bias, rtol=1e-10, atol=1e-12)
    assert (lin.weight - w0).abs().max() > 1e-3  # the steps moved the weights


class ExplicitAttention(nn.Module):
    """nn.MultiheadAttention's math with explicit Linear modules (the reference)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        E, self.h = mha.embed_dim, mha.num_heads
        self.qkv = nn.Linear(E, 3 * E).double()
        self.out = nn.Linear(E, E).double()
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.qkv.bias.copy_(mha.in_proj_bias)
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, x):  # (B, T, E), batch_first
        Bn, T, E = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.reshape(Bn, T, self.h, E // self.h).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (E // self.h) ** 0.5, -1)
        return self.out((att @ v).transpose(1, 2).reshape(Bn, T, E))


class SelfAttention(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("name", ["RING", "RKalman"])
def test_multihead_attention_steps_as_explicit_linear_projections(name):
    """nn.MultiheadAttention's packed in-projection and out-projection are K-FAC layers (seen
    through F.linear, no module rewrite): the steps equal those of the same attention written
    with two nn.Linear modules."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    ref = ExplicitAttention(mha)
    x = torch.randn(B, 5, 8, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (B,))
    w0 = mha.in_proj_weight.detach().clone()
    for body in (SelfAttention(mha), ref):
        torch.manual_seed(1)
        model = nn.Sequential(body, nn.Flatten(), nn.Linear(40, CLASSES)).double()
        assert _three_steps(model, name, x, y).describe().kfac_share == 1.0
    assert torch.allclose(mha.in_proj_weight, ref.qkv.weight, rtol=1e-9, atol=1e-12)
    assert torch.allclose(mha.out_proj.weight, ref.out.weight, rtol=1e-9, atol=1e-12)
    assert (mha.in_proj_weight - w0).abs().max() > 1e-3


class OneHotLinear(nn.Module):
    """An embedding written as a bias-free Linear on one-hot rows (the dense reference)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.vocab = emb.num_embeddings
        self.lin = nn.Linear(emb.num_embeddings, emb.embedding_dim, bias=False).double()
        with torch.no_grad():
            self.lin.weight.copy_(emb.weight.T)

    def forward(self, ids):
        return self.lin(F.one_hot(ids, self.vocab).double())


@pytest.mark.parametrize("name, kw", [("RING", {}), ("RING", dict(form="gauss_newton")),
                                      ("RKalman", dict(kalman_refresh_every=1))],
                         ids=["RING", "RING-gn", "RKalman"])
def test_embedding_steps_as_the_one_hot_linear(name, kw):
    """nn.Embedding gets K-FAC with a diagonal A (token frequencies, §2.1): its steps equal
    those of a Linear on explicit one-hot rows (dense A), over (B, T) token ids."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4).double()
    ref = OneHotLinear(emb)
    ids = torch.randint(0, 8, (B, 5))  # tokens 8, 9 never occur
    y = torch.randint(0, CLASSES, (B,))
    e0 = emb.weight.detach().clone()
    for body in (emb, ref):
        torch.manual_seed(1)
        model = nn.Sequential(body, nn.Tanh(), nn.Flatten(), nn.Linear(20, CLASSES)).double()
        assert _three_steps(model, name, ids, y, **kw).describe().kfac_share == 1.0
    assert torch.allclose(emb.weight, ref.lin.weight.T, rtol=1e-9, atol=1e-12)
    assert (emb.weight - e0).abs().max() > 1e-3
    assert torch.equal(emb.weight[8:], e0[8:])  # unseen tokens do not move


@pytest.mark.parametrize("conv, why", [
    (nn.Conv2d(4, 4, 3, groups=4), "a depthwise convolution (groups=4): no K-FAC helper"),
    (nn.Conv2d(4, 8, 3, groups=2), "a grouped convolution (groups=2): no K-FAC helper"),
    (nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular"), "padding_mode='circular': no K-FAC")])
def test_an_uncovered_convolution_is_diagonal_and_describe_says_why(conv, why):
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 4, 6, 6))
    opt = gt.RING(model.parameters(), model=model)
    entry = {e.name: e for e in opt.describe().entries}["0.weight"]
    assert entry.structure == "diagonal" and why in entry.reason, entry
