"""The structure report and what it tells: K-FAC layers by module path, diagonal leaves with
their reason (tied, layer type, MultiheadAttention, not reached), the one-time warning when most
weight matrices are diagonal, and factors that needed extra damping (counted, named by module
path) instead of an aborted run."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.torch._util import closure_for


class TiedLM(nn.Module):
    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2's lm_head

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.wte(x))))


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        return loss

    return closure


def test_tied_weight_is_reported_not_given_one_use_kfac():
    torch.manual_seed(0)
    model = TiedLM()
    opt = gt.RING(model.parameters(), model=model, lr=0.1)
    x = torch.randint(0, 11, (4, 5))
    opt.step(_closure(opt, model, x, x))
    by = {e.name: e for e in opt.describe().entries}
    assert by["mid.weight"].structure == "kfac" and by["mid.weight"].layer == "mid"
    tied = by["wte.weight"]
    assert tied.structure == "diagonal"
    assert "tied" in tied.reason and "head" in tied.reason and "wte" in tied.reason
    assert tied.reason.count("tied") == 1  # one reason naming every holder, not one per use
    assert [w for w, _ in opt.group_state(0).layers] == [1]  # only mid's weight



class ScaledEmbedding(nn.Embedding):
    """An embedding whose class overrides forward (BART's `BartScaledWordEmbedding`)."""

    def forward(self, x):
        return super().forward(x) * 2.0


class SharedEmbeddings(nn.Module):
    """BART's layout: `shared`, the encoder's and the decoder's embeddings and the head all
    hold one weight, only the head a type that would get K-FAC."""

    def __init__(self):
        super().__init__()
        self.shared = ScaledEmbedding(11, 6)
        self.enc, self.dec = ScaledEmbedding(11, 6), ScaledEmbedding(11, 6)
        self.enc.weight = self.dec.weight = self.shared.weight
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x) + self.dec(x)))


def test_a_tied_weight_names_every_module_that_holds_it():
    """Not only the holders that would have been K-FAC layers (before: "tied: head hold this
    one weight", which read as if one module held it)."""
    model = SharedEmbeddings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mostly diagonal: it is
        opt = gt.RING(model.parameters(), model=model)
    reason = {e.name: e for e in opt.describe().entries}["shared.weight"].reason
    assert reason.startswith("tied: shared, enc, dec, head hold this one weight"), reason


def test_the_biases_of_layers_sharing_a_weight_are_not_called_tied():
    """`b.weight = a.weight` ties the weights only: each bias is its layer's own (before:
    "tied: a hold this one weight" for both biases)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mostly diagonal: it is
        opt = gt.RING(model.parameters(), model=model)
    entries = {e.name: e.reason for e in opt.describe().entries}
    assert entries["0.weight"].startswith("tied: 0, 2 hold this one weight"), entries
    for bias in ("0.bias", "2.bias"):
        assert "the bias of a layer whose weight is tied" in entries[bias], entries
        assert "hold this one weight" not in entries[bias]

class LongNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_block_with_a_long_name = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)])
        self.pos = nn.Embedding(3, 4).requires_grad_(False)

    def forward(self, x):
        for m in self.encoder_block_with_a_long_name:
            x = m(x)
        return x


def test_the_table_aligns_long_names_and_says_what_it_counts():
    """Columns aligned past 40 characters of name; "1 step"; before the first step a frozen
    layer's reason says what that step will do; IPython shows the table, not the tuple."""
    model = LongNames()
    opt = gt.RING(model.parameters(), model=model)
    before = {e.name: e for e in opt.describe().entries}["pos.weight"].reason
    assert before.startswith("frozen (requires_grad=False)") and "if still frozen" in before
    x = torch.randn(8, 4)
    step_bad = torch.full((8, 4), float("nan"))
    for batch in (x, step_bad):
        opt.zero_grad()
        model(batch).square().mean().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    rep = opt.describe()
    text = str(rep)
    assert ", 1 step skipped" in text.splitlines()[0]
    rows = [line for line in text.splitlines()[1:] if line.startswith("  ") and "(" in line
            and not line.startswith("  [")]  # not the footnotes
    starts = {line.index("(") for line in rows}  # the shape column
    assert len(starts) == 1, text
    after = {e.name: e for e in rep.entries}["pos.weight"].reason
    assert "at the first step" in after and "weight and bias" not in after  # no bias

    class Printer:
        out = ""

        def text(self, t):
            self.out += t
    p = Printer()
    rep._repr_pretty_(p, False)
    assert p.out == text


def test_a_module_called_twice_gets_statistics_from_both_calls():
    """One Linear applied twice per forward (weight sharing by reuse): its hooks see both
    calls, so K-FAC holds; A is the mean over both calls' rows (2B rows) and S sums
    both calls' output gradients per example (expand: sᵀs/B over 2B rows)."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()
    head = nn.Linear(4, 2).double()
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), head)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    opt = gt.RING(model.parameters(), model=model, lr=0.0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.describe().entries[0].structure == "kfac"
    h1 = torch.tanh(shared(x))
    a = torch.cat([x, h1])
    a = torch.cat([a, torch.ones(12, 1, dtype=a.dtype)], 1)
    layer = opt.group_state(0).core.curvature.kfac[0]
    assert torch.allclose(layer.A, a.T @ a / 12, rtol=1e-12)
    z1 = shared(x)
    z2 = shared(torch.tanh(z1))
    losses = F.cross_entropy(head(torch.tanh(z2)), y, reduction="none")
    g1, g2 = torch.autograd.grad(losses.sum(), [z1, z2])
    s = torch.cat([g1, g2])
    assert torch.allclose(layer.S, s.T @ s / 6, rtol=1e-10)


def test_multihead_attention_projections_are_kfac_layers():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    opt = gt.RING(layer.parameters(), model=layer)
    by = {e.name: e for e in opt.describe().entries}
    assert by["self_attn.in_proj_weight"].layer == "self_attn.in_proj"
    assert by["self_attn.out_proj.weight"].layer == "self_attn.out_proj"
    assert by["linear1.weight"].structure == "kfac"
    cross = nn.MultiheadAttention(8, 2, kdim=5, vdim=5)  # separate q/k/v weights
    with pytest.warns(UserWarning, match="3 of 4 weight matrices"):
        opt = gt.RING(cross.parameters(), model=cross)
    by = {e.name: e for e in opt.describe().entries}
    assert by["q_proj_weight"].structure == "diagonal"
    assert "separate q/k/v" in by["q_proj_weight"].reason


def test_mostly_diagonal_warns_once_with_reasons():
    model = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Flatten(), nn.Bilinear(8, 8, 3))
    with pytest.warns(UserWarning, match=r"2 of 2 weight matrices.*sparse=True.*Bilinear"):
        gt.RING(model.parameters(), model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt.RING(model.parameters(), model=model, structure="diagonal")  # chosen: no warning


def test_layers_the_loss_does_not_reach_are_reported_after_the_first_step():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.spare1 = nn.Linear(3, 3)
            self.spare2 = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Unused()
    opt = gt.RING(model.parameters(), model=model, lr=0.1)
    assert all(e.structure == "kfac" for e in opt.describe().matrices())  # candidates
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.warns(UserWarning, match="2 of 3 weight matrices.*not reached by the loss"):
        opt.step(_closure(opt, model, x, y))
    by = {e.name: e for e in opt.describe().entries}
    assert by["spare1.weight"].structure == "diagonal"
    assert "not reached" in by["spare1.weight"].reason
    assert by["used.weight"].structure == "kfac"


def test_a_factor_that_is_not_positive_definite_gets_counted_extra_damping():
    """float32 inputs of rank 2 in 16 columns (scaled copies, so rounding leaves noise of
    either sign in the 14 null directions, far above the damping 1e-30): A + π√λ I is not
    numerically positive definite. The step goes on with extra damping for that factor,
    warns once naming the layer by module path, and describe() counts it."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(16, 3))
    u = torch.randn(64, 2) * 1e4
    x = torch.cat([u * c for c in (1, 3, 1 / 7, 1.1, 0.3, 2.9, 5.3, 0.77)], 1)
    y = torch.randint(0, 3, (64,))
    opt = gt.RING(model.parameters(), model=model, lr=0.01, damping=1e-30, rho=0.0,
                  form="gauss_newton", inverse_method="cholesky")
    with pytest.warns(RuntimeWarning, match=r"factor A of layer 'proj'.*extra damping"):
        opt.step(_closure(opt, model, x, y))
    report = opt.describe()
    assert report.skipped == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (inc,) = [i for i in report.incidents if i.factor == "A"]
    assert inc.layer == "'proj'" and inc.kind == "extra damping" and inc.extra_damping > 0
    assert "extra damping: factor A of 'proj'" in str(report)


def test_mostly_diagonal_counts_elements_not_matrices():
    """An LSTM LM: 2 of 4 weight matrices off K-FAC but most of the elements (the LSTM's):
    warned, with the element share, as describe()'s summary counts them."""

    class LSTMLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(5, 8)
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.lstm(self.emb(x))[0])

    with pytest.warns(UserWarning, match=r"2 of 4 weight matrices, holding 9\d% of all "):
        model = LSTMLM()
        opt = gt.RING(model.parameters(), model=model)
    assert opt.describe().kfac_share < 0.5


def test_mostly_diagonal_criterion():
    from grng_core.describe import mostly_diagonal

    assert mostly_diagonal([10, 10], [30]) == 0.6  # 1 of 3 matrices, 60% of the elements
    assert mostly_diagonal([30], [10, 10]) is None  # 2 of 3 matrices, 40% of the elements
    assert mostly_diagonal([10], [10]) is None  # half: not more than half
    assert mostly_diagonal([10], []) is None
    assert mostly_diagonal([], []) is None


@pytest.mark.parametrize("wrap", ["parametrizations.weight_norm", "parametrizations.spectral_norm",
                                  "parametrizations.orthogonal", "weight_norm"])
def test_a_computed_weight_is_reported_as_such(wrap):
    """torch.nn.utils.parametrize (and the older weight_norm hook) compute the layer's weight
    from other parameters: the layer stays on the diagonal, and describe() says why for every
    parameter of it (before: "no K-FAC helper for ParametrizationList", the bias blank)."""
    import functools

    fn = functools.reduce(getattr, wrap.split("."), torch.nn.utils)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the older weight_norm is deprecated; mostly diagonal
        model = nn.Sequential(fn(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 3))
        opt = gt.RING(model.parameters(), model=model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.step(closure_for(opt, model, F.cross_entropy, x, y))
    entries = {e.name: e for e in opt.describe().entries}
    first = [e for n, e in entries.items() if n.startswith("0.")]
    assert len(first) >= 2 and all(e.structure == "diagonal" for e in first)
    assert all("computed" in e.reason for e in first), [e.reason for e in first]
    assert entries["2.weight"].structure == entries["2.bias"].structure == "kfac"


def test_a_bias_in_another_group_and_a_parameter_outside_the_model_say_why():
    """The weight-decay recipe (weights in one group, biases and norms in another): the
    weights keep K-FAC, each bias is on the diagonal and says why (its reason was blank), as
    does a parameter the model does not hold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    extra = nn.Parameter(torch.zeros(()))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2] + [extra]
    opt = gt.RING([{"params": decay, "weight_decay": 1e-4}, {"params": rest}], model=model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + extra ** 2
        loss.backward()
        return loss
    opt.step(closure)
    by = {e.name: e for e in opt.describe().entries}
    assert by["0.weight"].structure == by["3.weight"].structure == "kfac"
    for bias, layer in (("0.bias", "'0'"), ("3.bias", "'3'")):
        assert by[bias].structure == "diagonal"
        assert f"bias of layer {layer}" in by[bias].reason and "param group 0" in by[bias].reason
    outside = [e for e in opt.describe().entries if e.name == "group 1 param 4"]
    assert outside and "not a parameter of the model" in outside[0].reason


def test_norm_modules_without_a_helper_are_named_normalisation():
    """RMSNorm-type modules (torch's nn.RMSNorm, transformers' LlamaRMSNorm, T5LayerNorm): a
    1-d scale, said so, not "no K-FAC helper" (which reads like a missed layer)."""

    class MyRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return self.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    model = nn.Sequential(nn.Linear(4, 6), MyRMSNorm(6), nn.Linear(6, 3))
    opt = gt.RING(model.parameters(), model=model)
    (norm,) = [e for e in opt.describe().entries if e.name == "1.weight"]
    assert norm.structure == "diagonal"
    assert norm.reason.endswith("normalisation scale (1-d, MyRMSNorm)")


def test_the_title_names_rings_form_where_it_is_not_the_default():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    first = str(gt.RING(model.parameters(), model=model, form="gauss_newton").describe())
    assert first.startswith("ring (gauss_newton): 4 parameter leaves")
    assert str(gt.RING(model.parameters(), model=model).describe()).startswith("ring: 4 ")


def test_cross_attention_in_projection_says_why_it_is_diagonal():
    """nn.MultiheadAttention with query ≠ key = value (a decoder's cross-attention) applies
    in_proj_weight by slices, its query rows and key/value rows on different inputs: no one
    K-FAC layer. Before, describe() said "not reached by the loss" (its gradient is not 0)."""
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.att(x[:, :2], x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Cross()
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mostly diagonal: it is
        opt = gt.RING(model.parameters(), model=model)
        opt.step(closure_for(opt, model, F.cross_entropy, x, y))
    entries = {e.name: e for e in opt.describe().entries}
    for name in ("att.in_proj_weight", "att.in_proj_bias"):
        assert entries[name].structure == "diagonal"
        assert entries[name].reason.startswith("applied by slices of the weight"), entries[name]
    assert entries["att.out_proj.weight"].structure == "kfac"
