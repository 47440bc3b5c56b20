"""A closure that calls the model more than once on the same input tensor (R-Drop; two heads'
losses from two forwards): the calls run the same examples, so E (the examples whose rows are
scaled by it, ALGORITHMS.md §2.1) counts them once, and each layer's calls are its uses, like
a module called twice inside one model call (K-FAC "expand"). Reference: the same modules
called twice inside ONE model call, whose E was always the batch. Before, E doubled (S's scale
by 2) and the steps differed by 25-39%. Per-example gradients need each example in one call
and refuse such a closure."""

from __future__ import annotations

import grng_torch as gt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.torch._util import flat, take_step


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.logits, self.aux = nn.Linear(6, 16), nn.Linear(16, 3), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"logits": self.logits(h), "aux": self.aux(h)}


class Twice(nn.Module):
    """Net called twice inside one model call."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["logits"], self.net(x)["aux"]


def _data(steps):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 6, dtype=torch.float64, generator=g),
             torch.randint(0, 3, (8,), generator=g),
             torch.randn(8, 2, dtype=torch.float64, generator=g)) for _ in range(steps)]


def _run(inside: bool, closure_free: bool = False, **kw):
    torch.manual_seed(0)
    net = Net().double()
    model = Twice(net) if inside else net
    opt = gt.RING(net.parameters(), model=model, lr=0.1, damping=0.1, **kw)
    for x, y, t in _data(12):
        def closure(x=x, y=y, t=t):
            opt.zero_grad()
            if inside:
                logits, aux = model(x)
            else:  # two model calls on the same x
                logits, aux = net(x)["logits"], net(x)["aux"]
            loss = F.cross_entropy(logits, y) + 0.5 * F.mse_loss(aux, t)
            loss.backward()
            return loss
        take_step(opt, closure, closure_free)
    assert int(opt.group_state(0).core.skipped) == 0
    return net, opt


@pytest.mark.parametrize("kw", [{}, {"form": "gauss_newton"}])
@pytest.mark.parametrize("closure_free", [False, True])
def test_two_calls_on_the_same_input_count_its_examples_once(kw, closure_free):
    ref, _ = _run(True, **kw)
    got, opt = _run(False, closure_free, **kw)
    assert all(e.structure == "kfac" for e in opt.describe().entries)
    start = flat(Net().double())
    moved = (flat(ref) - start).norm()
    assert moved > 1e-2
    assert (flat(got) - flat(ref)).norm() <= 1e-10 * moved


def test_micro_batches_of_one_tensor_updated_in_place_are_not_repeats():
    """A loop that copies each micro-batch into one buffer: a new version, new examples."""
    from tests.torch._util import accumulating_closure

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = gt.RING(net.parameters(), model=net)
    x, y, _ = _data(1)[0]
    buf = torch.empty(4, 6, dtype=torch.float64)
    calls = []

    def closure():
        opt.zero_grad()
        for k in range(2):
            buf.copy_(x[4 * k:4 * k + 4])
            (F.cross_entropy(net(buf), y[4 * k:4 * k + 4]) / 2).backward()
        calls.append((len(opt.collector.batch.calls), opt.collector.batch.repeats()))
        return None

    opt.step(closure)
    assert calls == [(2, False)] and opt.collector.batch.size is None  # cleared after
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt2 = gt.RING(twin.parameters(), model=twin)
    opt2.step(accumulating_closure(opt2, twin, F.cross_entropy, x, y, 2))
    torch.testing.assert_close(flat(net), flat(twin), rtol=1e-12, atol=1e-14)


def test_per_example_gradients_refuse_repeated_calls():
    torch.manual_seed(0)
    net = Net().double()
    opt = gt.RING(net.parameters(), model=net, structure="woodbury", loss_fn=nn.CrossEntropyLoss())
    x, y, _ = _data(1)[0]
    before = flat(net).clone()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x)["logits"], y) + net(x)["aux"].pow(2).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="same input tensor"):
        opt.step(closure)
    assert torch.equal(flat(net), before)
