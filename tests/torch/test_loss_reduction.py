"""A summed loss: K-FAC's statistics take the loss to be the batch mean (an example's output
gradient is B times its share), so `loss_fn` with reduction='sum' is refused when the
optimizer is built, naming the fix."""

from __future__ import annotations

import functools
import warnings

import grng_torch as gt
import pytest
import torch
from torch import nn
from torch.nn import functional as F


@pytest.mark.parametrize("cls", [gt.RING, gt.RENG, gt.RKalman])
def test_a_summed_loss_fn_is_refused(cls):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="reduction='mean'"):
        cls(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    cls(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss())  # the default: fine


@pytest.mark.parametrize("loss_fn", [functools.partial(F.cross_entropy, reduction="sum"),
                                     functools.partial(functools.partial(F.mse_loss),
                                                       reduction="sum")])
def test_a_summing_partial_is_refused(loss_fn):
    """A functional loss bound with reduction='sum' is the same summed loss."""
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="reduction='mean'"):
        gt.RING(model.parameters(), model=model, loss_fn=loss_fn)
    gt.RING(model.parameters(), model=model, loss_fn=functools.partial(F.cross_entropy))


def test_a_partial_with_reduction_none_is_refused_where_passes_need_the_mean():
    """Per-example passes (woodbury) need reduction='mean', through a partial too."""
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="reduction='mean'"):
        gt.RING(model.parameters(), model=model, structure="woodbury",
                loss_fn=functools.partial(F.cross_entropy, reduction="none"))


def _first_step(loss_of, model=True, batch=8, **kw):
    """The warnings of a RING step whose closure's loss is `loss_of(output, y, x)`."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(batch, 3), torch.randint(0, 2, (batch,))
    opt = gt.RING(net.parameters(), **(dict(model=net) if model else dict(structure="diagonal")),
                  **kw)

    def closure():
        opt.zero_grad()
        loss = loss_of(net(x), y, net)
        loss.backward()
        return loss
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.step(closure)
        opt.step(closure)  # warned once
    return [str(w.message) for w in seen if "sum over the batch" in str(w.message)]


SUMMED = {
    "cross_entropy": lambda o, y, n: F.cross_entropy(o, y, reduction="sum"),
    "mse": lambda o, y, n: F.mse_loss(o, F.one_hot(y, 2).float(), reduction="sum"),
    ".sum()": lambda o, y, n: (o - F.one_hot(y, 2).float()).abs().sum(),
    "sum + L2": lambda o, y, n: F.cross_entropy(o, y, reduction="sum")
    + 1e-3 * sum(p.pow(2).sum() for p in n.parameters()),
}
MEANS = {
    "mean": lambda o, y, n: F.cross_entropy(o, y),
    "sum / B": lambda o, y, n: F.cross_entropy(o, y, reduction="sum") / y.shape[0],
    "per-example sum, then mean": lambda o, y, n: (o - F.one_hot(y, 2).float()).pow(2)
    .sum(dim=1).mean(),
    "mean + L2 (a sum of parameters)": lambda o, y, n: F.cross_entropy(o, y)
    + 1e-3 * sum(p.pow(2).sum() for p in n.parameters()),
    "scaled": lambda o, y, n: 128.0 * F.cross_entropy(o, y),
    "mean + an unscaled sum of squares": lambda o, y, n: F.cross_entropy(o, y)
    + n[0].weight.pow(2).sum(),
    # a penalty on the parameters is no sum over the batch, whatever its shape or reduction
    # (both warned before the check followed the sum down to the model's output)
    "mean + L2-SP (mse_loss of the weights, reduction='sum')": lambda o, y, n: F.cross_entropy(
        o, y) + F.mse_loss(n[0].weight, torch.zeros_like(n[0].weight), reduction="sum"),
}


@pytest.mark.parametrize("name", list(SUMMED))
def test_a_closure_loss_summed_over_the_batch_warns_once(name):
    """K-FAC's statistics take the loss to be the batch mean: a closure that sums is told so
    on the first step (read from the loss's graph), with the batch size and the fix."""
    got = _first_step(SUMMED[name])
    assert len(got) == 1 and "B = 8" in got[0] and "reduction='mean'" in got[0]
    # without model= the optimizer sees neither the batch size nor the model's output: silent
    assert _first_step(SUMMED[name], model=False) == []


@pytest.mark.parametrize("name", list(MEANS))
def test_a_batch_mean_does_not_warn(name):
    assert _first_step(MEANS[name]) == []


def test_a_penalty_on_a_weight_with_the_batch_size_as_its_first_axis_does_not_warn():
    """The (4, 3) weight's sum of squares at batch 4: the summed tensor has the batch size on
    the batch axis, but its sum does not reach the model's output."""
    assert _first_step(MEANS["mean + an unscaled sum of squares"], batch=4) == []


def test_a_batch_of_one_does_not_warn():
    """Its sum is its mean."""
    assert _first_step(SUMMED["cross_entropy"], batch=1) == []
