"""Gradient accumulation: a closure that runs several micro-batches (each forward and backward,
each loss scaled by its share of the batch) takes the combined batch's step: the K-FAC rows
of every micro-batch, paired call by call and scaled by the closure's examples, the
per-example gradients and "mc" passes of every micro-batch (ALGORITHMS.md §2.1). Steps
compared with the combined batch's to 1e-6 in float64, for every deterministic entry of the
optimizer table; backward() calls made before a closure-less step() are refused."""

from __future__ import annotations

import grng_torch as gt
import pytest
import torch
from torch import nn

from tests.torch._util import OPTIMIZERS, Problem, accumulating_closure, flat, ids

PROBLEM = Problem()
CRIT = nn.CrossEntropyLoss()
# "mc" draws labels: two draws of 16 are not one draw of 32, so those entries are not exact
EXACT = [i for i in OPTIMIZERS if dict(i.case.kwargs).get("fisher") != "mc"]


def _run(info, parts: int, steps: int = 3) -> torch.Tensor:
    model = PROBLEM.model(torch.float64)
    opt = info.make(model.parameters(), model, CRIT)
    batches = list(PROBLEM.batches(torch.float64, 32))
    for k in range(steps):
        torch.manual_seed(k)
        x, y = batches[k % len(batches)]
        opt.step(accumulating_closure(opt, model, CRIT, x, y, parts))
    return flat(model)


@pytest.mark.parametrize("info", EXACT, ids=ids(EXACT))
def test_micro_batches_in_the_closure_take_the_combined_batch_step(info):
    combined, start = _run(info, 1), flat(PROBLEM.model(torch.float64))
    for parts in (2, 4):
        split = _run(info, parts)
        moved = (combined - start).norm()
        assert moved > 1e-3  # the steps did something
        assert (split - combined).norm() <= 1e-6 * moved, (parts, (split - combined).norm())


def test_sequence_micro_batches_of_a_shared_weight_layer():
    """A Linear applied over (B, T, d) positions (n = B·T rows, shared-weight scale) and a
    closure of 2 micro-batches: the combined batch's K-FAC factors and step."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))

    def make():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Flatten(), nn.Linear(35, 3)).double()
        return m, gt.RING(m.parameters(), model=m, lr=0.1, damping=1e-2)

    out = []
    for parts in (1, 2):
        m, opt = make()
        opt.step(accumulating_closure(opt, m, CRIT, x, y, parts))
        opt.step(accumulating_closure(opt, m, CRIT, x, y, parts))
        out.append((flat(m), opt.group_state(0).core.curvature.kfac))
    (p1, k1), (p2, k2) = out
    assert torch.allclose(p1, p2, rtol=1e-9, atol=1e-12)
    for a, b in zip(k1, k2):
        assert torch.allclose(a.A, b.A, rtol=1e-10) and torch.allclose(a.S, b.S, rtol=1e-10)


def test_micro_batches_before_a_closure_free_step_equal_the_closure_run():
    """Backward passes before a `step()` without a closure (a loop that accumulates itself,
    each loss scaled by its share) give the step of the closure that runs the same
    micro-batches (README "Loops that call backward() themselves")."""
    x, y = next(PROBLEM.batches(torch.float64))
    out = []
    for closure_free in (False, True):
        model = PROBLEM.model(torch.float64)
        opt = gt.RING(model.parameters(), model=model, lr=0.1)
        for _ in range(3):
            if closure_free:
                opt.zero_grad()
                for xs, ys in zip(x.chunk(2), y.chunk(2)):
                    (CRIT(model(xs), ys) / 2).backward()
                opt.step()
            else:
                opt.step(accumulating_closure(opt, model, CRIT, x, y, 2))
        out.append((flat(model), opt.group_state(0).core.curvature.kfac))
    (p1, k1), (p2, k2) = out
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-14)
    for a, b in zip(k1, k2):
        torch.testing.assert_close(a.A, b.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.S, b.S, rtol=1e-12, atol=1e-14)
