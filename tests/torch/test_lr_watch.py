"""A scheduler that changes `lr` while the KL trust region binds changes nothing on the clipped
steps (README "`lr`, schedules and weight decay under the trust region"): the optimizer says so
once, naming the lr below which it takes effect; not when the region did not bind, is off, or
lr did not change."""

from __future__ import annotations

import re
import warnings

import grng_torch as gt
import pytest
import torch
from torch import nn


def _run(steps=5, schedule=True, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = gt.RING(model.parameters(), model=model, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s) if schedule else None
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()
    return [str(w.message) for w in got if "lr changed" in str(w.message)], got


def test_a_schedule_under_a_binding_trust_region_is_told_once():
    msgs, got = _run()
    assert len(msgs) == 1, msgs
    (w,) = [w for w in got if "lr changed" in str(w.message)]
    assert w.filename == __file__  # points at the user's step, through the scheduler's wrap
    m = re.search(r"from ([\d.e-]+) to ([\d.e-]+).* shortened the last step to ([\d.e-]+) "
                  r"of its length.* below about ([\d.e-]*\d)", msgs[0])
    before, now, nu, below = (float(v) for v in m.groups())
    assert (before, now) == (0.1, 0.09) and 0 < nu < 1
    assert below == pytest.approx(before * nu, rel=0.05)
    assert "kl_clip=None" in msgs[0]


@pytest.mark.parametrize("kw", [dict(kl_clip=None), dict(kl_clip=1e9)])
def test_no_word_when_the_region_is_off_or_does_not_bind(kw):
    assert _run(**kw)[0] == []


def test_no_word_without_an_lr_change():
    assert _run(schedule=False)[0] == []
