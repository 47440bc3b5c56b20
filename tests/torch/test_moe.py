"""A mixture of experts: an expert is called on the tokens routed to it, some steps on none
and some on one. No rows is no part in the batch (its factors are kept, `Stats.absent`), not
a 0/0 that skips the whole step (R-Kalman: a ZeroDivisionError); one routed token is one
example's row, not an input the batch shares (whose layer would stop refreshing)."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch
from torch import nn
from torch.nn import functional as F

OPTS = {"RING": (gt.RING, {}), "RING-gn": (gt.RING, {"form": "gauss_newton"}),
        "RENG": (gt.RENG, {}), "RKalman": (gt.RKalman, {})}


class TwoExperts(nn.Module):
    """Hard routing by the sign of the first feature."""

    def __init__(self):
        super().__init__()
        self.e0, self.e1 = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        m = x[:, 0] > 0
        out = x.new_zeros(x.shape[0], 3)
        out = out.index_put((m.nonzero()[:, 0],), self.e0(x[m]))
        return out.index_put(((~m).nonzero()[:, 0],), self.e1(x[~m]))


def _batch(t: int, to_e1: int):
    """16 tokens: 8 to each expert on even steps, `to_e1` to expert e1 on odd ones."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 0.1
    x[: 8 if t % 2 == 0 else to_e1, 0] *= -1
    return x, (x[:, 1] > 0).long()


def _run(name, to_e1: int, steps: int = 4):
    torch.manual_seed(0)
    net = TwoExperts().double()
    cls, kw = OPTS[name]
    opt = cls(net.parameters(), model=net, **kw)
    A_e1 = []
    for t in range(steps):
        x, y = _batch(t, to_e1)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        A_e1.append(opt.group_state(0).core.curvature.kfac[1].A.clone())
    return opt, A_e1


@pytest.mark.parametrize("name", list(OPTS))
def test_an_expert_without_tokens_keeps_its_factors_and_skips_nothing(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning, no "shared" warning
        opt, A_e1 = _run(name, to_e1=0)
    assert int(opt.group_state(0).core.skipped) == 0
    assert torch.equal(A_e1[1], A_e1[0]) and torch.equal(A_e1[3], A_e1[2])  # no tokens
    assert not torch.equal(A_e1[2], A_e1[1])  # refreshed again with tokens (warm-up steps)
    assert "100% of weight-matrix elements under K-FAC" in str(opt.describe())


@pytest.mark.parametrize("name", list(OPTS))
def test_an_expert_with_one_token_keeps_refreshing(name):
    """Before: the (1, 8) input was taken for one the batch shares, with a warning, and the
    expert's factors were kept unrefreshed for the rest of the run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt, A_e1 = _run(name, to_e1=1)
    assert int(opt.group_state(0).core.skipped) == 0
    assert not torch.equal(A_e1[1], A_e1[0]) and not torch.equal(A_e1[3], A_e1[2])
    if name == "RKalman":
        return  # its factors are a belief's (§3.3), not an EMA of the batches'
    x, _ = _batch(1, 1)
    a = torch.cat([x[:1], torch.ones(1, 1, dtype=x.dtype)], 1)  # the one token, bias column
    beta = 0.95  # ema_decay: step 2's factor is the EMA of step 1's and this row's aᵀa
    torch.testing.assert_close(A_e1[1], beta * A_e1[0] + (1 - beta) * a.T @ a,
                               rtol=1e-12, atol=1e-14)


def test_an_expert_without_tokens_at_the_first_step_says_so():
    torch.manual_seed(0)
    net = TwoExperts().double()
    opt = gt.RING(net.parameters(), model=net)
    x, y = _batch(1, 0)  # every token to e0

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert "called on an input without rows at the first step" in str(opt.describe())
