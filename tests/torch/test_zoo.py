"""The model zoo (tests/torch/zoo.py) as a new user runs it: tiny GPT2LMHeadModel and
BertForSequenceClassification (transformers, from configs), a ResNet-style CNN with BatchNorm
on scikit-learn's digits, an nn.TransformerEncoder classifier. For each: `describe()` puts every
projection / linear / conv layer the adapter covers under K-FAC and reports the rest with a
reason; every optimizer trains 40 steps at the documented setting (lr 0.05, damping 1e-2,
kl_clip 1e-3) without a skipped step, a non-finite loss or a factor incident."""

from __future__ import annotations

import warnings

import grng_torch as gt
import pytest
import torch

from tests.torch.zoo import ZOO

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

SETTING = dict(lr=0.05, damping=1e-2, kl_clip=1e-3)
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
            x, y = z.batch(k)

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = z.loss(z.model(x), y)
                loss.backward()
                return loss

            losses.append(float(opt.step(closure).detach()))
    report = opt.describe()
    assert report.skipped == 0 and not report.incidents
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first and max(losses) < 1.5 * losses[0], losses  # trains, never diverges
