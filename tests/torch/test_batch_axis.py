"""`batch_axis=1`: a sequence-first model called with ids (T, B). The output-gradient rows are
scaled by the examples' count (ALGORITHMS.md §2.1's B); with the default axis 0 such a model
has T taken for B and its S factors come out T/B times too large. With batch_axis=1 its steps
equal those of the same model called batch-first, its sequence-first position ids (T, 1) go to
the diagonal as (1, T) ones do, and what needs per-example gradients is refused."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch
from torch import nn

from tests.torch._util import flat, step_on

V, B, T, D = 20, 4, 12, 8


class Tagger(nn.Module):
    """Token and position embeddings, a hidden layer, per-token logits; `seq_first`: takes ids
    (T, B) and works sequence-first, else (B, T). The same function of the same weights."""

    def __init__(self, seq_first: bool):
        super().__init__()
        self.seq_first = seq_first
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.hidden, self.head = nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, x):
        n = x.shape[0 if self.seq_first else 1]
        ids = torch.arange(n)[:, None] if self.seq_first else torch.arange(n)[None]
        out = self.head(torch.tanh(self.hidden(self.tok(x) + self.pos(ids))))
        return (out.transpose(0, 1) if self.seq_first else out).reshape(-1, V)


def _run(seq_first: bool, steps: int = 12, **kw):
    torch.manual_seed(0)
    model = Tagger(seq_first).double()
    opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B * T,),
                                                                       generator=g)
        step_on(opt, model, x.t() if seq_first else x, y)
    return model, opt


def test_a_sequence_first_model_with_batch_axis_1_equals_the_batch_first_one():
    want, opt_bf = _run(False)
    got, opt_sf = _run(True, batch_axis=1)
    for e in (opt_bf.describe(), opt_sf.describe()):
        (pos,) = [x for x in e.entries if x.name == "pos.weight"]
        assert pos.structure == "diagonal" and "shared by a batch of 4" in pos.reason, pos
    moved = (flat(want) - flat(Tagger(False).double())).norm()
    assert moved > 1e-2
    assert (flat(got) - flat(want)).norm() <= 1e-10 * moved


def test_the_default_axis_takes_t_for_b_in_a_sequence_first_model():
    """What the README warns of: S factors T/B = 3 times too large."""
    _, opt_bf = _run(False, steps=1)
    _, opt_sf = _run(True, steps=1)
    want = {f.layout.weight: f.S for f in opt_bf.group_state(0).core.curvature.kfac}
    got = {f.layout.weight: f.S for f in opt_sf.group_state(0).core.curvature.kfac}
    assert set(want) == {0, 2, 4} and set(got) == {0, 1, 2, 4}  # (T, 1) ids not recognised
    for w in want:
        assert torch.allclose(got[w], want[w] * (T / B), rtol=1e-10), w


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1"])
def test_a_batch_axis_that_is_not_an_axis_is_refused(bad):
    model = Tagger(True)
    with pytest.raises(ValueError, match="batch_axis must be an axis number"):
        gt.RING(model.parameters(), model=model, batch_axis=bad)


def test_per_example_gradients_need_axis_0():
    model = Tagger(True)
    with pytest.raises(ValueError, match="per-example gradients, which slice the model's "
                                         "inputs on axis 0, but batch_axis=1"):
        gt.RING(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(),
                structure="woodbury", batch_axis=1)


class GRULM(nn.Module):
    """A GRU language model in torch's default layout (batch_first=False); `transpose`: it
    takes (B, T) ids and transposes them itself."""

    def __init__(self, transpose: bool = False):
        super().__init__()
        self.transpose = transpose
        self.emb, self.rnn, self.head = nn.Embedding(V, D), nn.GRU(D, D), nn.Linear(D, V)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x.T if self.transpose else x))
        return self.head(h)


def _gru_warnings(batch_axis: int, transpose: bool, steps: int = 2) -> list[str]:
    torch.manual_seed(0)
    model = GRULM(transpose)
    ids = torch.randint(0, V, (B, T) if transpose else (T, B))
    targets = ids.T.flatten() if transpose else ids.flatten()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt = gt.RING(model.parameters(), model=model, batch_axis=batch_axis)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), targets)
            loss.backward()
            return loss
        for _ in range(steps):
            opt.step(closure)
    return [str(w.message) for w in seen if "batch_axis=1" in str(w.message)]


def test_a_sequence_first_rnn_read_batch_first_warns_once():
    """(T, B) ids with the default batch_axis=0: the GRU (batch_first=False) is called with
    T on its sequence axis, where the model's batch size was read: warned once, naming it."""
    got = _gru_warnings(0, transpose=False)
    assert len(got) == 1 and "rnn (GRU, batch_first=False)" in got[0] and f"as {T}" in got[0]


@pytest.mark.parametrize("batch_axis, transpose", [(1, False), (0, True)],
                         ids=["batch_axis=1", "the model transposes"])
def test_a_sequence_first_rnn_read_right_does_not_warn(batch_axis, transpose):
    assert _gru_warnings(batch_axis, transpose) == []


class PackedLSTM(nn.Module):
    """An LSTM fed a PackedSequence: its hook never sees a (T, B, E) tensor."""

    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(V, D), nn.LSTM(D, D), nn.Linear(D, V)

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(x), [T] * x.shape[1])
        h, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0])
        return self.head(h)


def test_the_sequence_first_watch_goes_after_the_first_step():
    """Its hooks cost nothing later: removed after one look, and after the first step where
    there was nothing to look at (a PackedSequence)."""
    torch.manual_seed(0)
    model = PackedLSTM()
    ids = torch.randint(0, V, (T, B))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mostly diagonal (the LSTM)
        opt = gt.RING(model.parameters(), model=model)  # the default axis: watched
    assert len(model.rnn._forward_pre_hooks) == 1

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        return loss
    for _ in range(2):
        opt.step(closure)
    assert len(model.rnn._forward_pre_hooks) == 0 and not opt.collector.sequence_watch
