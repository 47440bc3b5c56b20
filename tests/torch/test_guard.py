"""The non-finite guard through grng_torch's optimizers: a non-finite step leaves the
parameters and the core state unchanged and counts the skip; raise mode raises; invalid
hyperparameters are rejected at construction."""

from __future__ import annotations

import math
import warnings

import grng_torch
import pytest
import torch
from torch import nn

import grng_core as gc
from tests import cases

# every optimizer x structure of the table, each with its builder's estimator
CASES = cases.select(default_estimator=True, bare=True)


def _flat_state(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_state(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat_state(v, f"{prefix}[{i}]"))
        return out
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.detach().clone()}
    return {}


@pytest.mark.parametrize("case", CASES, ids=cases.ids(CASES))
def test_torch_adapter_skips_nonfinite_step(case):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    crit = nn.CrossEntropyLoss()
    opt = case.torch(model.parameters(), lr=0.1, model=model, loss_fn=crit)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def closure_for(inputs):
        def closure():
            opt.zero_grad()
            loss = crit(model(inputs), y)
            loss.backward()
            return loss
        return closure

    opt.step(closure_for(x))  # a good step first
    first = next(model.parameters())
    core_before = _flat_state(gc.codec.encode(opt.state[first]["grng"].core))
    params_before = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure_for(bad))
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), q)
    core_after = _flat_state(gc.codec.encode(opt.state[first]["grng"].core))
    assert set(core_after) == set(core_before)
    for k in core_before:
        if k == "/skipped":
            assert int(core_after[k]) == int(core_before[k]) + 1
        else:
            assert torch.equal(core_after[k], core_before[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step(closure_for(x))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torch_adapter_raise_mode():
    model = nn.Sequential(nn.Linear(5, 3))
    crit = nn.CrossEntropyLoss()
    opt = grng_torch.RING(model.parameters(), lr=0.1, model=model, loss_fn=crit,
                          on_nonfinite="raise")
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    x[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_torch_adapter_rejects_invalid_hyperparameter():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"damping=-1\.0.*\(0\.0, inf\)"):
        grng_torch.RING(model.parameters(), lr=0.1, damping=-1.0, model=model)


def test_gpu_skip_reports_arrive_one_step_later_without_a_wait():
    """grng_torch._skips: a counter copy that has not landed is kept (no stall), one that
    has is reported once (the CUDA event is stood in for: this machine has no GPU)."""
    import torch
    from grng_torch._skips import SkipMonitor, _Pending

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    mon = SkipMonitor()
    mon.pending = [_Pending(0, 0, torch.tensor(1), Event(False))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.poll()  # not landed: nothing read, nothing said
    assert len(mon.pending) == 1
    with pytest.warns(RuntimeWarning, match="1 step"):
        mon.poll(wait=True)
    assert mon.pending == [] and mon.seen == {0: 1}
    mon.pending = [_Pending(0, 1, torch.tensor(1), Event(True))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.poll()  # no new skip since the last report
    mon.after_step(0, torch.tensor(3))  # a CPU counter: the core already warned, nothing kept
    assert mon.pending == []


@pytest.mark.parametrize("name", ["RKalman", "RING", "RENG"])
def test_a_nan_batch_leaves_no_factor_incident(name):
    """The NaN of a skipped step, not rounding, breaks its factorisations: the step's
    incident records (extra damping, a refreshed R-Kalman belief) are dropped with it, so the
    only warning is the skip's and `describe()` lists no incident (before, R-Kalman warned six
    factors 'lost positive definiteness to rounding' and used up their one warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = getattr(grng_torch, name)(model.parameters(), model=model)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    bad = x.clone()
    bad[3, 2] = float("nan")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for t in range(4):
            xb = bad if t == 2 else x

            def closure(xb=xb):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), y)
                loss.backward()
                return loss
            opt.step(closure)
    messages = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "non-finite" in messages[0], messages
    assert int(opt.group_state(0).core.skipped) == 1
    assert opt.incidents(0).entries() == ()
