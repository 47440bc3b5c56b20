"""grng_torch keeps the K-FAC rows on every step and the core preconditions in factored form
(ALGORITHMS.md §2.1): the same parameters as the dense product, in float64, also when the
closure clips the gradient or adds a loss term the hooks do not see."""

import grng_torch
import pytest
import torch
from torch import nn

from grng_core.structures import factored, kfac_eigen
from tests.torch._util import closure_for


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
                         nn.Linear(64, 10)).double()


def _train(closure_kind: str, form: str, steps: int = 12):
    model = _model()
    opt = grng_torch.RING(model.parameters(), model=model, lr=0.1, rho=0.05, damping=0.1,
                          curvature_every=5, inverse_every=5, momentum=0.5, form=form)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (32,), generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if closure_kind == "l2":
                loss = loss + 1e-3 * sum((p * p).sum() for p in model.parameters())
            loss.backward()
            if closure_kind == "clip_norm":
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if closure_kind == "clip_value":
                nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def calls(monkeypatch):
    """Calls of the factored products: explicit inverses (gauss_newton) and eigenbases
    (adaptive_damping with inverse_every > 1)."""
    count = [0]
    for module, name in ((factored, "apply"), (kfac_eigen, "_factored")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            count[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return count


@pytest.mark.parametrize("form", ["adaptive_damping", "gauss_newton"])
@pytest.mark.parametrize("kind,expect_factored", [("plain", True), ("clip_norm", True),
                                                  ("l2", False), ("clip_value", False)])
def test_factored_steps_equal_dense_steps(monkeypatch, calls, kind, expect_factored, form):
    factored_run = _train(kind, form)
    used = calls[0]
    monkeypatch.setattr(factored, "cheaper", lambda *a: False)  # dense everywhere
    dense_run = _train(kind, form)
    assert calls[0] == used
    if expect_factored:
        assert used >= 12  # every step (curvature or not) of the two wide layers
    else:
        assert used == 0
    for a, b in zip(factored_run, dense_run):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_rows_the_core_would_not_use_are_not_kept(monkeypatch):
    """On a step that refreshes nothing the hooks keep a layer's rows only where the factored
    form pays (§2.1): a Linear over long sequences (n = B·T rows) keeps nothing."""
    import grng_torch.layers.base as base

    kept: list[int] = []
    real = base.HookedLayer.input_rows
    monkeypatch.setattr(base.HookedLayer, "input_rows",
                        lambda layer, x: kept.append(x.shape[0]) or real(layer, x))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    opt = grng_torch.RING(model.parameters(), model=model, lr=0.1, curvature_every=5,
                          inverse_every=5, refresh_warmup=0)
    x = torch.randn(4, 256, 16, dtype=torch.float64)  # 1024 rows per layer call
    y = torch.randint(0, 4, (4 * 256,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 4), y)
        loss.backward()
        return loss

    opt.step(closure)  # a curvature step: both layers' rows
    assert len(kept) == 2
    kept.clear()
    opt.step(closure)  # refreshes nothing: n = 1024 rows, the dense product is cheaper
    assert kept == []


def test_float32_rows_for_a_float64_state_stay_factored(monkeypatch, factored_calls):
    """float32 parameters with state_dtype="float64": the rows and the gradient agree to
    float32's rounding, so the check uses float32's √eps (`LayerRows.tol`) and the factored
    form serves; it equals the dense product to float32 precision."""
    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
        opt = grng_torch.RING(model.parameters(), model=model, lr=0.1, state_dtype="float64",
                              form="gauss_newton", refresh_warmup=0)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
            opt.step(closure_for(opt, model, nn.functional.cross_entropy, x, y))
        return [p.detach().clone() for p in model.parameters()]

    got = train()
    assert factored_calls[0] >= 6
    monkeypatch.setattr(factored, "cheaper", lambda *a: False)
    ref = train()
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
