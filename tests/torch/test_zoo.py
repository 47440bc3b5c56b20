"""The model zoo (tests/torch/zoo.py) as a new user runs it: tiny GPT2LMHeadModel and
BertForSequenceClassification (transformers, from configs), a ResNet-style CNN with BatchNorm
on scikit-learn's digits, an nn.TransformerEncoder classifier. For each: `describe()` puts every
projection / linear / conv layer the adapter covers under K-FAC and reports the rest with a
reason; every optimizer trains 40 steps at its defaults (`gt.RING(model.parameters(),
model=model)`: the recommended setting, README "Defaults") without a skipped step, a non-finite
loss or a factor incident, its loss falling and never 1.5x above the first."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch

from tests.torch.zoo import ZOO

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

SETTING: dict = {}  # the defaults
OPTIMIZERS = {"RING": {}, "RING-gauss_newton": dict(form="gauss_newton"), "RENG": {},
              "RKalman": {}}


@pytest.mark.parametrize("name", list(ZOO))
def test_describe_covers_the_layers(name):
    z = ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no model here is mostly diagonal: no warning
        opt = gt.RING(z.model.parameters(), model=z.model)
    report = opt.describe()
    by_name = {e.name: e for e in report.entries}
    layers = {e.layer for e in report.entries if e.layer}
    for suffix in z.kfac:
        assert any(n.endswith(suffix) for n in layers), (suffix, sorted(layers))
    for e in report.matrices():  # every weight matrix of a covered module type is K-FAC
        if e.structure == "kfac":
            assert e.layer and e.name.startswith(e.layer.rsplit(".in_proj", 1)[0]), e
    for n in z.diagonal:
        hits = [e for k, e in by_name.items() if k.endswith(n)]
        assert hits and all(e.structure == "diagonal" and e.reason for e in hits), hits
    for e in report.entries:
        assert e.structure == "kfac" or e.reason, e  # every diagonal leaf says why
    assert str(report).count("\n") == len(report.entries)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(ZOO))
def test_short_training_run(name, opt_name):
    z = ZOO[name]()
    cls = getattr(gt, opt_name.split("-")[0])
    opt = cls(z.model.parameters(), model=z.model, **SETTING, **OPTIMIZERS[opt_name])
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a skip or an incident warns
        for k in range(40):
            losses.append(float(z.step(opt, k).detach()))
    report = opt.describe()
    assert report.skipped == 0 and not report.incidents
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first and max(losses) < 1.5 * losses[0], losses  # trains, never diverges


@pytest.mark.parametrize("name", list(ZOO))
def test_shared_weight_block_follows_the_expand_formula(name):
    """float64: the K-FAC factors of a layer applied at T > 1 positions per example (a
    transformer projection over tokens, a convolution over pixels) after one step (lr 0)
    equal A = ãᵀã/(B·T) and S = sᵀs/B with s = B·∂L/∂z, from the layer's input and output
    captured by a plain forward hook and retain_grad (§2.1, K-FAC "expand")."""
    z = ZOO[name]()
    model = z.model.double()
    layer = model.get_submodule(z.probe)
    x, y = z.batch(0)
    x = x.double() if x.is_floating_point() else x
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.update(a=i[0], z=o))
    model.zero_grad()
    out = model(x)
    seen["z"].retain_grad()
    z.loss(out, y).backward()
    handle.remove()
    B = x.shape[0]
    if isinstance(layer, torch.nn.Conv2d):
        a = torch.nn.functional.unfold(seen["a"], layer.kernel_size, padding=layer.padding,
                                       stride=layer.stride).transpose(1, 2)
        s = seen["z"].grad.movedim(1, -1)
    else:
        a, s = seen["a"], seen["z"].grad
    a = a.reshape(-1, a.shape[-1]).detach()
    s = s.reshape(-1, s.shape[-1]) * B
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    assert a.shape[0] > B  # T > 1 positions per example
    opt = gt.RING(model.parameters(), model=model, lr=0.0)

    def closure():
        opt.zero_grad()
        loss = z.loss(model(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    weight_pos = [i for i, p in enumerate(opt.param_groups[0]["params"]) if p is layer.weight]
    (kl,) = [L for L in opt.group_state(0).core.curvature.kfac
             if L.layout.weight == weight_pos[0]]
    assert torch.allclose(kl.A, a.T @ a / a.shape[0], rtol=1e-9, atol=1e-14)
    assert torch.allclose(kl.S, s.T @ s / B, rtol=1e-9, atol=1e-14)
