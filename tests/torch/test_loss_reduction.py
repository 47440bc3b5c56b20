"""A summed loss: K-FAC's statistics take the loss to be the batch mean (an example's output
gradient is B times its share), so `loss_fn` with reduction='sum' is refused when the
optimizer is built, naming the fix."""

from __future__ import annotations

import functools

import grng_torch as gt
import pytest
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
