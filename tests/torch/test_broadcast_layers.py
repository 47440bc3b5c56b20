"""A layer called on an input the batch shares (GPT-2's and BERT's position embeddings take ids
of shape (1, T), broadcast over the examples afterwards): its hook sees the output gradient
summed over the examples, so per-example K-FAC rows (ALGORITHMS.md §2.1) cannot be read. Such a
layer goes to the diagonal structure at the first step, with the reason in describe(), and the
steps then equal the combined batch's under gradient accumulation (with K-FAC on that layer they
depended on how the batch was split)."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng_core as gc
from tests.torch._util import accumulating_closure, flat, step_on

V, T, D = 11, 6, 8


class PositionLM(nn.Module):
    """Token and position embeddings (position ids (1, T) for "row", (T,) for "vector"), one
    hidden layer, a next-token head."""

    def __init__(self, pos_ids: str = "row"):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.hidden, self.head = nn.Linear(D, D), nn.Linear(D, V)
        self.pos_ids = pos_ids

    def forward(self, x):
        ids = torch.arange(x.shape[1])
        if self.pos_ids == "pairwise":  # T5's relative positions: ids (T, T), pooled to (T, D)
            pos = self.pos((ids[:, None] - ids[None, :]).abs()).mean(dim=1)
        else:
            pos = self.pos(ids[None] if self.pos_ids == "row" else ids)
        return self.head(torch.tanh(self.hidden(self.tok(x) + pos)))


def _batches(B: int, steps: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g))
            for _ in range(steps)]


def _lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def _run(parts: int, B: int = 8, steps: int = 12, pos_ids: str = "row", **kw):
    torch.manual_seed(0)
    model = PositionLM(pos_ids).double()
    opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1, **kw)
    for x, y in _batches(B, steps):
        opt.step(accumulating_closure(opt, model, _lm_loss, x, y, parts))
    return model, opt


def _entries(opt, prefix: str):
    return [e for e in opt.describe().entries if e.name.startswith(prefix)]


@pytest.mark.parametrize("form,pos_ids", [("adaptive_damping", "row"),
                                          ("gauss_newton", "row"),
                                          ("adaptive_damping", "vector"),
                                          ("adaptive_damping", "pairwise")])
def test_a_layer_shared_by_the_batch_is_diagonal_and_accumulation_is_exact(form, pos_ids):
    """Position ids of shape (1, T) (GPT-2, BERT): a leading axis of 1 in a call of 8
    examples; of shape (T,) (nanoGPT's arange(T)): one example's shape; of shape (T, T) (T5's
    relative positions): pairs of one example's positions."""
    combined, opt = _run(1, form=form, pos_ids=pos_ids)
    (pos,) = _entries(opt, "pos.")
    assert pos.structure == "diagonal" and "shared by a batch of 8" in pos.reason, pos
    assert all(e.structure == "kfac" for e in _entries(opt, "hidden."))
    assert all(e.structure == "kfac" for e in _entries(opt, "tok."))
    start = flat(PositionLM().double())
    for parts in (2, 4):
        split, _ = _run(parts, form=form, pos_ids=pos_ids)
        moved = (flat(combined) - start).norm()
        assert moved > 1e-2
        assert (flat(split) - flat(combined)).norm() <= 1e-9 * moved, parts


class SequenceFirst(nn.Module):
    """Ids (T, B) through a sequence-first encoder, a head on (B, d), and a layer applied to
    one example's vector at a time: every input is per example, none has a leading axis of 1."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0), 1,
                                         enable_nested_tensor=False)
        self.each, self.head = nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, x):
        h = self.enc(self.tok(x)).mean(0)  # (B, d)
        h = torch.stack([torch.tanh(self.each(v)) for v in h])  # (d,) inputs, one per example
        return self.head(h)


def test_per_example_inputs_without_the_batch_first_stay_on_kfac():
    torch.manual_seed(0)
    model = SequenceFirst().double()
    x, y = torch.randint(0, V, (T + 6, 8)), torch.randint(0, V, (8,))  # 12 positions > 8
    opt = gt.RING(model.parameters(), model=model)
    step_on(opt, model, x, y)
    assert not opt.collector.broadcast
    for prefix in ("tok.", "each.", "head.", "enc.layers.0.linear1."):
        assert all(e.structure == "kfac" for e in _entries(opt, prefix)), prefix


def test_attention_on_sequences_of_one_token_stays_on_kfac():
    """nn.MultiheadAttention(batch_first=True) lays its input out (T, B, E) inside: its packed
    projection on T = 1 is not an input the batch shares."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, D), nn.MultiheadAttention(D, 2, batch_first=True))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.att, self.out = model[0], model[1], nn.Linear(D, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.att(h, h, h)[0][:, 0])

    net = Head().double()
    opt = gt.RING(net.parameters(), model=net)
    step_on(opt, net, torch.randn(8, 1, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    assert all(e.structure == "kfac" for e in _entries(opt, "att.in_proj"))


@pytest.mark.parametrize("replicated", [False, True])
def test_a_layer_found_shared_after_its_first_step_keeps_its_factors_and_warns(replicated):
    """The first step with one example per call gives the position table per-example rows
    (K-FAC); batches of 8 later share its input: a warning, and its factors stay as they were
    while the other layers' refresh."""
    torch.manual_seed(0)
    model = PositionLM().double()
    ident = gc.Collective(mean=lambda v: v, gather=lambda v: v, replicas=1)  # one process
    opt = gt.RING(model.parameters(), model=model, curvature_every=1,
                  collective=ident if replicated else None)
    steps = [_batches(1, 1)[0]] + _batches(8, 3)
    kfac = []
    with pytest.warns(UserWarning, match=r"K-FAC layer 'pos' was called on an input of shape "
                                         r"\(1, 6\) shared by a batch of 8"):
        for x, y in steps:
            opt.step(accumulating_closure(opt, model, _lm_loss, x, y, 1))
            kfac.append([f.A.clone() for f in opt.group_state(0).core.curvature.kfac])
    pos = [w for w, _ in opt.group_state(0).layers].index(1)  # pos.weight is parameter 1
    assert all(torch.equal(k[pos], kfac[0][pos]) for k in kfac[1:])
    assert not torch.equal(kfac[-1][pos - 1], kfac[0][pos - 1])  # the token table refreshes
    (e,) = _entries(opt, "pos.")
    assert e.structure == "kfac" and e.reason.startswith("factors kept from before"), e


def test_a_batch_of_one_example_keeps_the_position_embedding_on_kfac():
    """With one example per call nothing is shared: the (1, T) ids are that example's rows."""
    _, opt = _run(1, B=1, steps=3)
    assert all(e.structure == "kfac" for e in _entries(opt, "pos."))


def test_gpt2_accumulation_equals_the_combined_batch():
    """The README's accumulation bullet: a 2-layer GPT-2 from transformers, 2 × 4 against 8
    (before, its `wpe` on K-FAC made the split run differ by ~1e-3)."""
    pytest.importorskip("transformers")
    from tests.torch.zoo import gpt2

    def run(parts: int):
        z = gpt2(B=8)
        z.model.double()
        opt = gt.RING(z.model.parameters(), model=z.model)
        for k in range(12):
            opt.step(accumulating_closure(opt, z.model, z.loss, *z.batch(k), parts))
        return z, opt

    (z1, opt), (z2, _) = run(1), run(2)
    (wpe,) = _entries(opt, "transformer.wpe.")
    assert wpe.structure == "diagonal" and "shared by a batch" in wpe.reason, wpe
    moved = (flat(z1.model) - flat(gpt2(B=8).model.double())).norm()
    assert moved > 1e-2
    assert (flat(z2.model) - flat(z1.model)).norm() <= 1e-9 * moved


@pytest.mark.parametrize("how", ["state_dict", "file"])
def test_a_resumed_run_says_why_the_shared_layer_is_on_the_diagonal(how, tmp_path):
    """A fresh optimizer that loads the state has seen no step of its own: describe() names
    the checkpoint, not "not reached by the loss" (as before), for the layer it left out."""
    _, opt = _run(1, steps=2)
    torch.manual_seed(0)
    model = PositionLM().double()
    fresh = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1)
    if how == "file":
        opt.save(tmp_path / "ckpt.npz")
        fresh.load(tmp_path / "ckpt.npz")
    else:
        fresh.load_state_dict(opt.state_dict())
    (pos,) = _entries(fresh, "pos.")
    assert pos.structure == "diagonal" and "loaded state" in pos.reason, pos
    assert all(e.structure == "kfac" for e in _entries(fresh, "hidden."))


def test_an_embedding_called_per_example_in_a_loop_stays_on_kfac():
    """ids of one example's shape (T,) that are slices of the model's input (a loop over the
    examples) are that example's own, not shared like nanoGPT's arange(T)."""
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.head = nn.Embedding(V, D), nn.Linear(D, V)

        def forward(self, x):
            return self.head(torch.stack([self.tok(x[b]) for b in range(x.shape[0])]))

    torch.manual_seed(0)
    model = Loop().double()
    opt = gt.RING(model.parameters(), model=model)
    x, y = _batches(4, 1)[0]
    opt.step(accumulating_closure(opt, model, _lm_loss, x, y, 1))
    assert not opt.collector.broadcast
    assert all(e.structure == "kfac" for e in opt.describe().entries)


def test_position_ids_as_long_as_the_batch_warn_that_they_cannot_be_told_apart():
    """nanoGPT's arange(T) with T = B has the shape of B per-example ids: the layer stays on
    K-FAC (as before), with a warning naming the fix (before: silently)."""
    torch.manual_seed(0)
    model = PositionLM("vector").double()
    opt = gt.RING(model.parameters(), model=model)
    x, y = _batches(T, 1)[0]  # B = T = 6
    with pytest.warns(UserWarning, match=r"'pos' is called on ids of shape \(6,\).*arange"):
        opt.step(accumulating_closure(opt, model, _lm_loss, x, y, 1))
    (pos,) = _entries(opt, "pos.")
    assert pos.structure == "kfac"
    x, y = _batches(T, 1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        opt.step(accumulating_closure(opt, model, _lm_loss, x, y, 1))
