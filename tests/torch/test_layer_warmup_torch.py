"""grng_torch's per-layer warm-up (ALGORITHMS.md §2.1): a convolution whose patches give it
at least `warmup_rows`·max(d_A, d_S) rows per step skips the warm-up's refreshes, and its hook
keeps no rows on those steps; the small-batch head takes them. Checked against the same run
with every layer warming up (`warmup_rows=None`), in float64, for every optimizer and fisher."""

import grng_torch
import pytest
import torch
from torch import nn

from tests.torch._util import closure_for

B = 8  # conv: 8·8·8 = 512 rows >= 10·max(10, 4); head: 8 rows < 10·257


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3)).double()


def _run(name, steps, **kw):
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    opt = getattr(grng_torch, name)(model.parameters(), model=model, loss_fn=loss_fn, **kw)
    g = torch.Generator().manual_seed(1)
    kept = []  # per step: the hooked layers whose rows the collector kept
    coll, clear = opt.collector, opt.collector.clear

    def recording_clear():  # the step clears the rows before and after itself
        if coll.a:
            kept.append(sorted(coll.a))
        clear()

    coll.clear = recording_clear
    for _ in range(steps):
        x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (B,), generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    layers = opt.group_state(0).core.curvature.kfac
    return opt, kept, {layer.layout.d_out: layer for layer in layers}


@pytest.mark.parametrize("name,kw", [("RING", {}), ("RING", {"form": "gauss_newton"}),
                                     ("RENG", {}), ("RKalman", {}),
                                     ("RING", {"fisher": "mc"})])
def test_the_convolution_skips_the_warm_up_and_keeps_no_rows(name, kw):
    opt, kept, skip = _run(name, 3, **kw)
    _, _, first = _run(name, 1, **kw)
    _, _, every = _run(name, 2, warmup_rows=None, **kw)
    conv, head = 4, 3  # layers by d_out
    names = [L.name for L in opt.collector.layers]
    assert [[names[i] for i in k] for k in kept] == [["0", "3"], ["3"], ["3"]]
    report = opt.describe()  # tells which layers skipped it
    assert report.no_warmup == ("0",) and "refresh warm-up skipped" in str(report)
    # the convolution's factors are step 0's; the head's took steps 1 and 2
    for f in ("A", "S"):
        torch.testing.assert_close(getattr(skip[conv], f), getattr(first[conv], f), rtol=0,
                                   atol=0)
        assert not torch.equal(getattr(skip[head], f), getattr(first[head], f))
    _, _, skip2 = _run(name, 2, **kw)
    # step 1 from the same parameters: the head's factors as when every layer warms up
    for f in ("A", "S"):
        torch.testing.assert_close(getattr(skip2[head], f), getattr(every[head], f),
                                   rtol=1e-12, atol=1e-14)
        assert not torch.equal(getattr(every[conv], f), getattr(first[conv], f))


def test_a_group_whose_layers_all_skip_the_warm_up():
    """A large-batch MLP: every K-FAC layer skips the warm-up (64 rows >= 10·5), so the
    warm-up steps carry no K-FAC rows at all; the factors stay step 0's until step 10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = grng_torch.RING(model.parameters(), model=model)
    g = torch.Generator().manual_seed(1)
    factors = []
    for _ in range(12):
        x = torch.randn(64, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (64,), generator=g)
        opt.step(closure_for(opt, model, nn.functional.cross_entropy, x, y))
        factors.append(opt.group_state(0).core.curvature.kfac[0].A.clone())
    assert all(torch.equal(f, factors[0]) for f in factors[:10])
    assert not torch.equal(factors[10], factors[0])
    assert opt.describe().no_warmup == ("0",)
