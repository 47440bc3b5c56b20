"""Param groups with the same hyperparameters change no step, as in torch.optim: ‖g‖² (RING's
c_t, the finite-difference radius), the trust region's ⟨d, ĝ⟩ and the regularised gradient's
H·g are the whole model's (ALGORITHMS.md §1, §3.2, §3 tail; `grng_core.Whole`). Reference:
the same optimizer with one group, float64. Before the fix two groups moved RING's step by
107% of its norm at the defaults (Hugging Face's Trainer always makes two groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.torch._util import OPTIMIZERS, Problem, flat, ids, train

LOSS = nn.CrossEntropyLoss()
# every optimizer and structure, the library's trust region (kl_clip) on and off
ENTRIES = [i for i in OPTIMIZERS if i.structure in ("kfac", "diagonal")]


def _groups(model, split: bool):
    if not split:
        return list(model.parameters())
    first, last = model[0], model[2]
    return [{"params": list(first.parameters())}, {"params": list(last.parameters())}]


def _run(info, split: bool, **extra):
    problem = Problem()
    model = problem.model(torch.float64)
    opt = info.make(_groups(model, split), model, LOSS, **extra)
    train(opt, model, LOSS, problem, torch.float64, steps=4)
    return flat(model)


@pytest.mark.parametrize("kl_clip", [1e-3, None], ids=["kl_clip", "no_kl_clip"])
@pytest.mark.parametrize("info", ENTRIES, ids=ids(ENTRIES))
def test_two_groups_equal_one(info, kl_clip):
    start = flat(Problem().model(torch.float64))
    one, two = _run(info, False, kl_clip=kl_clip), _run(info, True, kl_clip=kl_clip)
    moved = (one - start).norm()
    assert moved > 1e-6  # the steps did something
    torch.testing.assert_close(two, one, rtol=0, atol=1e-10 * float(moved))


def test_the_trust_region_sums_over_groups_with_their_learning_rates():
    """κ against Σ_i η_i²⟨d_i, ĝ_i⟩ (kfac-pytorch's sum over layers with each one's lr): with
    ρ = 0 and no momentum, d_i is the group's own NGD direction, so the clipped step is
    ν·η_i·d_i with one ν = √(κ / Σ_i η_i²⟨d_i, g_i⟩), read here from unclipped steps."""
    import grng_torch

    problem = Problem()
    x, y = next(problem.batches(torch.float64))

    def step(kl_clip):
        model = problem.model(torch.float64)
        before = [p.detach().clone() for p in model.parameters()]
        groups = _groups(model, True)
        groups[1]["lr"] = 0.05
        opt = grng_torch.RING(groups, lr=0.5, rho=0.0, damping=1e-2, kl_clip=kl_clip,
                              model=model, loss_fn=LOSS)

        def closure():
            opt.zero_grad()
            loss = LOSS(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        grads = [p.grad.detach().clone() for p in model.parameters()]
        return [p.detach() - b for p, b in zip(model.parameters(), before)], grads

    free, grads = step(None)  # u_i = −η_i d_i
    lrs = [0.5, 0.5, 0.05, 0.05]
    quad = sum(float(lr * (-(u * g).sum())) for lr, u, g in zip(lrs, free, grads))
    kappa = 1e-4
    nu = min(1.0, (kappa / quad) ** 0.5)
    assert nu < 0.5  # clipped
    clipped, _ = step(kappa)
    for c, f in zip(clipped, free):
        torch.testing.assert_close(c, nu * f, rtol=1e-9, atol=1e-14)
