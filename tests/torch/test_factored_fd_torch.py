"""grng_torch keeps the K-FAC rows of the finite-difference oracle's shifted passes, and the
core preconditions ĝ = Σ cᵢ gᵢ in factored form (ALGORITHMS.md §1, §2.1): the same
parameters as the dense product in float64 (RENG and R-Kalman, every scheme, micro-batches),
and dense where the closure adds a term the hooks do not see."""

import grng_torch
import pytest
import torch
from torch import nn

from grng_core.structures import factored


def _train(build, kind: str, steps: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
                          nn.Linear(64, 10)).double()
    opt = build(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (16,), generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            parts = (slice(0, 16),) if kind != "accumulate" else (slice(0, 8), slice(8, 16))
            for sl in parts:
                loss = nn.functional.cross_entropy(model(x[sl]), y[sl]) / len(parts)
                if kind == "l2":
                    loss = loss + 1e-3 * sum((p * p).sum() for p in model.parameters())
                loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


BUILDS = {
    "reng_forward": lambda m: grng_torch.RENG(m.parameters(), model=m, lr=0.1, rho=0.05,
                                              damping=0.1, gr="finite_difference",
                                              curvature_every=3, inverse_every=3),
    "reng_central": lambda m: grng_torch.RENG(m.parameters(), model=m, lr=0.1, rho=0.05,
                                              damping=0.1, gr="finite_difference",
                                              fd_scheme="central", curvature_every=3,
                                              inverse_every=3),
    "rkalman": lambda m: grng_torch.RKalman(m.parameters(), model=m, lr=0.1, rho=0.05,
                                            damping=0.1, curvature_every=3, inverse_every=3),
}


@pytest.mark.parametrize("name", sorted(BUILDS))
@pytest.mark.parametrize("kind,expect_factored", [("plain", True), ("accumulate", True),
                                                  ("l2", False)])
def test_factored_fd_steps_equal_dense_steps(monkeypatch, factored_calls, name, kind,
                                             expect_factored):
    build = BUILDS[name]
    got = _train(build, kind)
    used = factored_calls[0]
    monkeypatch.setattr(factored, "cheaper", lambda *a: False)  # dense everywhere
    ref = _train(build, kind)
    assert factored_calls[0] == used
    if expect_factored:
        assert used >= 6  # at least the first layer on every step
    else:
        assert used == 0
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_the_shifted_pass_leaves_the_steps_own_rows_alone(monkeypatch, factored_calls):
    """The step's own rows and model calls survive the oracle's pass (`Collector.side_pass`):
    the second param group, updated after the first group's oracle ran, gets its own rows
    (the run equals the dense one)."""
    def two_groups(m):
        return grng_torch.RENG([{"params": m[:2].parameters()}, {"params": m[2:].parameters()}],
                               model=m, lr=0.1, rho=0.05, damping=0.1, gr="finite_difference",
                               curvature_every=3, inverse_every=3)

    got = _train(two_groups, "plain")
    assert factored_calls[0] >= 6
    monkeypatch.setattr(factored, "cheaper", lambda *a: False)
    ref = _train(two_groups, "plain")
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_rows_kept_only_where_the_stacked_count_pays(monkeypatch):
    """A 128 × 65 layer at batch 40 pays in factored form with its own 40 rows (RING) but not
    with the 80 of a forward-difference ĝ: on a step that refreshes nothing RENG's hooks keep
    none of its rows, in the closure's pass or the shifted one."""
    import grng_torch.layers.base as base

    kept: list[int] = []
    real = base.HookedLayer.input_rows
    monkeypatch.setattr(base.HookedLayer, "input_rows",
                        lambda layer, x: kept.append(x.shape[0]) or real(layer, x))
    x = torch.randn(40, 64, dtype=torch.float64)
    y = torch.randint(0, 128, (40,))
    got = {}
    for name, cls, kw in (("ring", grng_torch.RING, {}),
                          ("reng", grng_torch.RENG, dict(gr="finite_difference"))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128)).double()
        opt = cls(model.parameters(), model=model, lr=0.1, rho=0.05, curvature_every=5,
                  inverse_every=5, refresh_warmup=0, **kw)

        def closure(opt=opt, model=model):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)  # a curvature step: the rows of the closure's pass
        kept.clear()
        opt.step(closure)  # refreshes nothing
        got[name] = list(kept)
    assert got == {"ring": [40], "reng": []}


def test_16_bit_rows_are_not_kept():
    """Rows in bfloat16 / float16 (autocast, half parameters) never pass the probe check at
    the state's √eps: the hooks keep none for the factored form."""
    from grng_torch._layer_rows import factored_pays
    from grng_torch.layers import find_layers

    layer = find_layers(nn.Sequential(nn.Linear(64, 128))).layers[0]
    x = torch.randn(16, 64)
    assert factored_pays(layer, x)
    assert not factored_pays(layer, x.to(torch.bfloat16))
    assert not factored_pays(layer, x.half())
    assert not factored_pays(layer, x, passes=4)  # 64 rows: the dense product is cheaper
