"""Which tensor argument of a model call gives the batch size (ALGORITHMS.md §2.1's B, the
scale of the output-gradient rows): the first with the batch axis, unless it has 1 there and a
later one has more (position ids (1, T) passed before the ids, an ODE's time (1,) before the
state), then that later one, with one warning; a 0-d first argument is skipped. Before, both
read B = 1 silently (a reviewer's tiny Llama: RING's first step 17% off)."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch
from torch import nn

V, B, T, D = 20, 6, 5, 8


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.hidden, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, input_ids, position_ids=None):
        h = self.tok(input_ids)
        if position_ids is not None:
            h = h + 0.1 * position_ids[..., None].to(h.dtype)
        return self.head(torch.tanh(self.hidden(h)))


class Field(nn.Module):
    """An ODE right-hand side f(t, x) (torchdiffeq's order)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x) + t.reshape(-1)[:1]))


def _run(model, call, loss_of, name):
    opt = getattr(gt, name)(model.parameters(), model=model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = loss_of(call(model))
                loss.backward()
                return loss
            opt.step(closure)
    notes = [w for w in rec if "the batch size is taken from" in str(w.message)]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), notes


@pytest.mark.parametrize("name", ["RING", "RENG", "RKalman"])
def test_position_ids_first_give_the_steps_of_input_ids_first(name):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    pos = torch.arange(T)[None]

    def loss_of(logits):
        return nn.functional.cross_entropy(logits.reshape(-1, V), ids.reshape(-1))

    torch.manual_seed(0)
    ref, notes = _run(LM().double(), lambda m: m(input_ids=ids, position_ids=pos), loss_of, name)
    assert not notes
    torch.manual_seed(0)
    got, notes = _run(LM().double(), lambda m: m(position_ids=pos, input_ids=ids), loss_of, name)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert len(notes) == 1 and "'position_ids', has 1 along axis 0 and 'input_ids' has 6" in \
        str(notes[0].message)


@pytest.mark.parametrize("t", [torch.tensor(0.3), torch.tensor([0.3])], ids=["0-d", "(1,)"])
def test_an_ode_time_first_gives_the_steps_of_the_state_first(t):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = t.double()

    def loss_of(out):
        return (out ** 2).mean()

    class StateFirst(Field):
        def forward(self, x, t):
            return super().forward(t, x)

    torch.manual_seed(0)
    ref, _ = _run(StateFirst().double(), lambda m: m(x, t), loss_of, "RING")
    torch.manual_seed(0)
    got, notes = _run(Field().double(), lambda m: m(t, x), loss_of, "RING")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert len(notes) == (1 if t.dim() else 0)


def test_a_model_used_through_other_methods_is_refused_naming_the_fix_before_any_change():
    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(6, 2), nn.Linear(2, 6)

        def encode(self, x):
            return self.enc(x)

        def decode(self, z):
            return self.dec(torch.tanh(z))

        def forward(self, x):
            return self.decode(self.encode(x))

    model = VAE()
    x = torch.randn(8, 6)
    before = [p.detach().clone() for p in model.parameters()]
    opt = gt.RING(model.parameters(), model=model)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model.decode(model.encode(x)), x)
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match=r"batch size is unknown \(nothing was changed\).*"
                                           r"encode and decode.*call the model itself"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.group_state(0) is None


def test_one_example_with_a_later_table_keeps_one_and_says_so():
    """Batch-1 training with a (T, T) float mask passed after the ids (1, T): the mask is not
    the batch (another dtype), B stays 1 as for the model without that argument; one note."""
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(2))
    mask = torch.triu(torch.ones(T, T, dtype=torch.float64), 1)

    class Masked(LM):
        def forward(self, input_ids, m=None):
            out = super().forward(input_ids)
            return out if m is None else out + 0.0 * m.sum()

    def loss_of(logits):
        return nn.functional.cross_entropy(logits.reshape(-1, V), ids.reshape(-1))

    torch.manual_seed(0)
    ref, notes = _run(Masked().double(), lambda m: m(ids), loss_of, "RING")
    assert not notes
    torch.manual_seed(0)
    model = Masked().double()
    opt = gt.RING(model.parameters(), model=model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = loss_of(model(ids, mask))
                loss.backward()
                return loss
            opt.step(closure)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    said = [str(w.message) for w in rec if "the batch size is taken as 1" in str(w.message)]
    assert len(said) == 1 and f"positional argument 1 has {T}" in said[0]
