"""A GRNG optimizer on part of a model, another optimizer on the rest (README "Tied
embeddings"): the parameters of `model=` that no param group holds ("bystanders", here GPT-2's
tied `wte`) keep the `.grad` of the closure's first pass through the extra passes of a
finite-difference or double-backprop step, so the other optimizer reads the minibatch gradient
at the current point, not a shifted point's (or None)."""

from __future__ import annotations

import grng_torch as gt
import pytest
import torch
from torch import nn

from tests.torch.zoo import ZOO

pytest.importorskip("transformers")

CASES = [("RING", dict(form="gauss_newton")), ("RENG", {}),
         ("RENG", dict(gr="finite_difference", fd_scheme="central")), ("RKalman", {})]


def _split(model):
    tied = model.transformer.wte.weight
    return tied, [p for n, p in model.named_parameters() if "wte" not in n]


def _loss(model, x, y):
    logits = model(x).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_bystander_grad_is_the_first_pass_gradient(name, kw):
    z = ZOO["gpt2"](seed=0)
    model = z.model.double()
    tied, rest = _split(model)
    x, y = z.batch(0)
    model.zero_grad()
    _loss(model, x, y).backward()
    want = tied.grad.clone()
    model.zero_grad(set_to_none=True)
    opt = getattr(gt, name)(rest, model=model, **kw)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    assert tied.grad is not None
    torch.testing.assert_close(tied.grad, want, rtol=1e-10, atol=1e-14)


def test_ring_with_adamw_on_the_tied_embedding_trains():
    z = ZOO["gpt2"](seed=1)
    model = z.model
    tied, rest = _split(model)
    before = tied.detach().clone()
    ring = gt.RING(rest, model=model, form="gauss_newton")
    adamw = torch.optim.AdamW([tied], lr=2e-3)
    losses = []
    for k in range(30):
        x, y = z.batch(k)

        def closure(x=x, y=y):
            model.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        losses.append(float(ring.step(closure).detach()))
        adamw.step()
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert ring.describe().skipped == 0
    assert not torch.equal(tied.detach(), before)
    described = {e.name for e in ring.describe().entries}
    assert "transformer.wte.weight" not in described
