"""A `torch.compile`d model (backend "aot_eager": aot_autograd without a C compiler): the
first-order paths train with K-FAC hooks intact; RENG's double backprop is refused with the
fix named, before anything changes."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _setup(name, hidden=(16,), **kw):
    """A compiled MLP 8-hidden…-3 (tanh), its optimizer and a closure on a fixed batch."""
    torch.manual_seed(0)
    widths = (8, *hidden)
    layers: list = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 3))
    compiled = torch.compile(model, backend="aot_eager")
    opt = getattr(gt, name)(model.parameters(), model=compiled, lr=0.1, **kw)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        return loss

    return model, opt, closure


@pytest.mark.parametrize("name, kw", [("RING", {}), ("RENG", dict(gr="finite_difference"))])
def test_compiled_model_trains_with_kfac(name, kw):
    """...and the hooks Dynamo traces call no array-api-compat helper (whose lru_cache
    wrappers Dynamo warns about as a "potential silent incorrectness"), also on the steps
    that refresh nothing (no warm-up here), where the hooks decide whether to keep rows."""
    model, opt, closure = _setup(name, refresh_warmup=0, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [float(opt.step(closure).detach()) for _ in range(5)]
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert losses[-1] < losses[0]
    assert opt.describe().kfac_share == 1.0


def test_double_backprop_on_a_compiled_model_names_the_fix():
    model, opt, closure = _setup("RENG")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="gr='finite_difference'"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["RING", "RKalman"])
def test_hooks_are_not_traced_per_layer(name):
    """The K-FAC hooks are bookkeeping: under torch.compile they run eagerly. Traced, Dynamo
    compiled one graph per layer and per state of the collector and hit its recompile limit
    (8) on a 6-layer MLP; the model's own graphs are all that is compiled now."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, opt, closure = _setup(name, hidden=(8,) * 6)
    for _ in range(12):
        opt.step(closure)
    assert counters["stats"]["unique_graphs"] <= 4  # Linear's variants; was 11 with the hooks
