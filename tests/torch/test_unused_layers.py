"""A K-FAC layer that takes no part in a step (a branch the model skips, a multi-task head
without a loss term) keeps its factors on that step, warm-up and scheduled refreshes alike
(`Stats.absent`); the other layers refresh as usual; a closure that runs no backward at all
is an error before anything changes."""

import warnings

import grng_torch
import pytest
import torch
from torch import nn

from tests.torch._util import TwoHeads

OPTS = [("RING", {}), ("RENG", {}), ("RKalman", {})]


def _setup(name, kw):
    torch.manual_seed(0)
    model = TwoHeads().double()
    opt = getattr(grng_torch, name)(model.parameters(), model=model, **kw)
    g = torch.Generator().manual_seed(1)

    def closure(both=True):  # a new batch every step: the factors move on every refresh
        x = torch.randn(16, 4, dtype=torch.float64, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x, both), y)
        loss.backward()
        return loss
    return model, opt, closure


def _factors(opt):
    layers = opt.group_state(0).core.curvature.kfac
    return [(L.A.clone(), L.S.clone()) for L in layers]


@pytest.mark.parametrize("name,kw", OPTS)
@pytest.mark.parametrize("step_of_absence", [3, 10])  # a warm-up step, a scheduled refresh
def test_a_head_left_out_keeps_its_factors_and_the_rest_refresh(name, kw, step_of_absence):
    model, opt, closure = _setup(name, kw)
    for _ in range(step_of_absence):
        opt.step(closure)
    before = _factors(opt)
    head2 = model.head2.weight.detach().clone()
    loss = opt.step(lambda: closure(both=False))
    after = _factors(opt)
    assert torch.isfinite(loss)
    # layers in registration order: body, head1, head2
    assert torch.equal(after[2][0], before[2][0]) and torch.equal(after[2][1], before[2][1])
    assert not torch.equal(after[0][0], before[0][0])  # the body refreshed its A
    assert not torch.equal(after[1][1], before[1][1])  # head1 its S
    assert torch.equal(model.head2.weight, head2)  # no gradient: not moved
    assert int(opt.group_state(0).core.skipped) == 0
    for _ in range(12):  # head2 back in play, through the next refresh
        opt.step(closure)
    assert not torch.equal(_factors(opt)[2][0], after[2][0])


def test_the_refresh_of_the_present_layers_matches_the_dense_reference():
    """The body's A after a step without head2 is the EMA with this batch's aᵀa/n, computed
    here in float64 from the inputs (refresh every step, β = 0.9)."""
    torch.manual_seed(0)
    model = TwoHeads().double()
    opt = grng_torch.RING(model.parameters(), model=model, curvature_every=1, inverse_every=1,
                          refresh_warmup=0, ema_decay=0.9)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))

    def closure(both=True):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x, both), y)
        loss.backward()
        return loss
    opt.step(closure)
    A0 = opt.group_state(0).core.curvature.kfac[0].A.clone()
    opt.step(lambda: closure(both=False))
    a = torch.cat([x, torch.ones(16, 1, dtype=torch.float64)], dim=1)
    expected = 0.9 * A0 + 0.1 * (a.T @ a) / 16
    torch.testing.assert_close(opt.group_state(0).core.curvature.kfac[0].A, expected,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,kw", OPTS)
@pytest.mark.parametrize("steps", [1, 25])  # a warm-up step, a step that refreshes nothing
def test_a_closure_without_backward_is_an_error_that_changes_nothing(name, kw, steps):
    model, opt, closure = _setup(name, kw)
    for _ in range(steps):
        opt.step(closure)
    params = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()

    def no_backward():
        opt.zero_grad()
        return nn.functional.cross_entropy(model(torch.randn(16, 4).double()),
                                           torch.zeros(16, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"loss\.backward\(\)"):
        opt.step(no_backward)
    assert opt.group_state(0).host_step == steps
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.state_dict()["state"].keys() == state["state"].keys()


def test_a_layer_not_reached_at_the_first_step_is_named_in_a_warning():
    """It stays on the diagonal for the run: a warning names it even though most matrices
    are on K-FAC (no warning when every layer takes part)."""
    model, opt, closure = _setup("RING", {})
    with pytest.warns(UserWarning, match=r"head2\.weight \(not reached by the loss"):
        opt.step(lambda: closure(both=False))
    assert "not reached" in str(opt.describe())
    model, opt, closure = _setup("RING", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
