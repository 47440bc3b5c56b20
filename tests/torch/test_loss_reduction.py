"""A summed loss: K-FAC's statistics take the loss to be the batch mean (an example's output
gradient is B times its share), so `loss_fn` with reduction='sum' is refused when the
optimizer is built, naming the fix."""

from __future__ import annotations

import grng_torch as gt
import pytest
from torch import nn


@pytest.mark.parametrize("cls", [gt.RING, gt.RENG, gt.RKalman])
def test_a_summed_loss_fn_is_refused(cls):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="reduction='mean'"):
        cls(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    cls(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss())  # the default: fine
