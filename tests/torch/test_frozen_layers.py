"""Frozen layers (requires_grad=False at the first step: fine-tuning a head, LoRA's base
weights) passed to the optimizer with `model.parameters()`: they take no K-FAC (no statistics
collected for them), describe() says they are frozen, no warning counts them as layers left to
the diagonal, they stay bit-identical, and the others' steps equal the run that was given the
trainable parameters only."""

from __future__ import annotations

import warnings

import grng_torch as gt
import torch
from torch import nn

from tests.torch._util import flat, step_on


class LoRA(nn.Module):
    """A frozen base Linear plus a trainable low-rank update."""

    def __init__(self, d_in: int, d_out: int, r: int = 2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.down, self.up = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12).requires_grad_(False), nn.Tanh(), LoRA(12, 12),
                         nn.Tanh(), nn.Linear(12, 4)).double()


def _run(trainable_only: bool, steps: int = 12):
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad] if trainable_only \
        else model.parameters()
    opt = gt.RING(params, model=model, lr=0.1, damping=0.1)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer counted as left to the diagonal
        for _ in range(steps):
            x, y = torch.randn(16, 6, generator=g).double(), torch.randint(0, 4, (16,), generator=g)
            step_on(opt, model, x, y)
    return model, opt


def test_frozen_layers_take_no_kfac_and_the_step_is_the_trainable_ones():
    model, opt = _run(False)
    frozen = {n: p for n, p in _model().named_parameters() if not p.requires_grad}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    by_name = {e.name: e for e in opt.describe().entries}
    for n in ("0.weight", "2.base.weight"):
        assert by_name[n].structure == "diagonal" and "frozen" in by_name[n].reason, by_name[n]
    for n in ("2.down.weight", "2.up.weight", "4.weight"):
        assert by_name[n].structure == "kfac", by_name[n]
    assert len(opt.group_state(0).core.curvature.kfac) == 3
    reference, _ = _run(True)
    moved = (flat(reference) - flat(_model())).norm()
    assert moved > 1e-2
    assert (flat(model) - flat(reference)).norm() <= 1e-12 * moved


def test_a_layer_unfrozen_later_trains_on_the_diagonal_and_says_why():
    """It was frozen at the first step, so it has no K-FAC factors: the step that finds it
    trainable warns once, naming it and the way to K-FAC, and describe() says so."""
    model, opt = _run(False, steps=3)
    model[0].requires_grad_(True)
    before = model[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            step_on(opt, model, torch.randn(16, 6).double(), torch.randint(0, 4, (16,)))
    said = [str(w.message) for w in seen if "trainable since" in str(w.message)]
    assert len(said) == 1 and "'0'" in said[0] and "add_param_group" in said[0]
    assert not torch.equal(model[0].weight, before)
    (e,) = [e for e in opt.describe().entries if e.name == "0.weight"]
    assert e.structure == "diagonal" and "trainable since" in e.reason
    (e,) = [e for e in opt.describe().entries if e.name == "2.base.weight"]
    assert "trainable since" not in e.reason  # still frozen


def test_a_layer_unfrozen_before_the_first_closure_free_step_takes_kfac():
    """The hooks are armed at construction for a step without a closure; whether a layer is
    frozen is decided at the first step, as with a closure."""
    model = _model()
    opt = gt.RING(model.parameters(), model=model)
    model[0].requires_grad_(True)
    step_on(opt, model, torch.randn(16, 6).double(), torch.randint(0, 4, (16,)),
            closure_free=True)
    (e,) = [e for e in opt.describe().entries if e.name == "0.weight"]
    assert e.structure == "kfac", e


def test_bias_only_fine_tuning_keeps_kfac_and_the_frozen_weights():
    """BitFit: the weights frozen, the biases trained: the layers keep K-FAC (the biases are
    preconditioned by their factors) and the weights stay bit-identical."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    for m in (model[0], model[2]):
        m.weight.requires_grad_(False)
    frozen = [model[0].weight.clone(), model[2].weight.clone()]
    bias = model[0].bias.detach().clone()
    opt = gt.RING(model.parameters(), model=model)
    for _ in range(3):
        step_on(opt, model, torch.randn(16, 6).double(), torch.randint(0, 4, (16,)))
    assert all(e.structure == "kfac" for e in opt.describe().entries)
    assert opt.describe().kfac_share == 1.0  # frozen weights in K-FAC layers still count
    assert torch.equal(model[0].weight, frozen[0]) and torch.equal(model[2].weight, frozen[1])
    assert not torch.equal(model[0].bias, bias)


class TiedLM(nn.Module):
    """A frozen tied embedding / head (as PEFT leaves GPT-2's wte) around a trainable Linear."""

    def __init__(self, vocab: int = 400, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d).requires_grad_(False)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def test_a_frozen_tied_matrix_counts_in_no_share_and_no_warning():
    """A frozen parameter off K-FAC for another reason (tied) is reported frozen, is left out
    of the K-FAC share and of the mostly-diagonal warning: before, LoRA on GPT-2 warned that
    76% of the weight-matrix elements were on the diagonal (the frozen wte) and described
    2% under K-FAC, with every trained matrix on K-FAC."""
    torch.manual_seed(0)
    model = TiedLM()
    opt = gt.RING(model.parameters(), model=model)
    x, y = torch.randint(0, 400, (16,)), torch.randint(0, 400, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_on(opt, model, x, y)
    rep = opt.describe()
    by_name = {e.name: e for e in rep.entries}
    assert by_name["emb.weight"].structure == "diagonal"
    assert by_name["emb.weight"].reason.startswith("frozen") and not by_name["emb.weight"].trained
    assert by_name["mid.weight"].structure == "kfac" and by_name["mid.weight"].trained
    assert rep.kfac_share == 1.0
    assert "100% of weight-matrix elements under K-FAC (of the trained ones: 1 frozen " \
        "matrices left out)" in str(rep)


def test_a_mostly_frozen_model_given_whole_is_warned_about_its_state():
    """LoRA on a large model given `model.parameters()`: the frozen base still gets optimizer
    state (torch.optim keeps none), so construction warns with the size and the fix; given the
    trainable parameters only, or with few frozen elements, it does not."""
    base = nn.Linear(1024, 1024).requires_grad_(False)  # 1,049,600 frozen elements
    head = nn.Linear(1024, 4)
    model = nn.Sequential(base, head)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        gt.RING(model.parameters(), model=model, momentum=0.5)
    (w,) = [w for w in got if "frozen (requires_grad=False)" in str(w.message)]
    text = str(w.message)
    assert "1,049,600 of the 1,053,700" in text and "if p.requires_grad" in text
    assert f"{1_049_600 * 4 * 2 / 2**30:.2f} GiB" in text  # moment + momentum, float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt.RING([p for p in model.parameters() if p.requires_grad], model=model)
        _run(False, steps=1)  # a small frozen share: not worth a warning
