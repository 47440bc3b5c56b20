"""scikit-learn's bundled digits (load_digits): an MLP and a small CNN trained with each
optimizer reach at least 95% test accuracy within 20 epochs (checked after every epoch; the
run stops once it is there)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from grng_core.reference import load_digits_split
from tests import cases
from tests.torch._util import closure_for

EPOCHS = 20
BATCH = 64
TARGET = 0.95


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


# each optimizer as built by default (tests/cases.py): K-FAC with double backprop (RENG), K-FAC
# (RING, adaptive_damping), the kfac belief with forward finite differences (R-Kalman); K-FAC's
# KL clip keeps the early ReLU-CNN steps sane
HP = {
    "reng": dict(lr=0.2, rho=0.05, damping=1e-2, kl_clip=1e-2),
    "ring": dict(lr=0.2, rho=0.05, damping=1e-2, kl_clip=1e-2),
    "rkalman": dict(lr=0.2, rho=0.05, damping=1e-2, kl_clip=1e-2),
}
CONFIGS = {c.class_name: c.using(**HP[c.optimizer]) for c in cases.defaults()}


@pytest.fixture(scope="module")
def digits():
    d = load_digits_split(seed=0)
    return (torch.tensor(d.x_train, dtype=torch.float32), torch.tensor(d.labels_train),
            torch.tensor(d.x_test, dtype=torch.float32), torch.tensor(d.labels_test))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model, opt, make_closure, digits, seed=0, sched=None) -> list[float]:
    """Epochs of minibatch steps, `opt.step(make_closure(x, y))`, until the test accuracy
    reaches TARGET; the accuracy after each epoch."""
    x_tr, y_tr, x_te, y_te = digits
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(x_tr.shape[0], generator=g)
        for i in range(0, x_tr.shape[0] - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            opt.step(make_closure(x_tr[idx], y_tr[idx]))
        if sched is not None:
            sched.step()
        model.eval()
        history.append(accuracy(model, x_te, y_te))
        if history[-1] >= TARGET:
            break
    return history


def fit(build, name, digits, seed=0):
    torch.manual_seed(seed)
    model = build()
    crit = nn.CrossEntropyLoss()
    opt = CONFIGS[name].torch(model.parameters(), model=model, loss_fn=crit)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    return train(model, opt, lambda x, y: closure_for(opt, model, crit, x, y), digits, seed,
                 sched)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
def test_digits_accuracy(build, name, digits):
    start = time.perf_counter()
    history = fit(build, name, digits)
    took = time.perf_counter() - start
    assert max(history) >= TARGET, (
        f"{name} on the {build.__name__}: test accuracy by epoch {history} ({took:.1f}s)")


def conv_bn_ln() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 10))


# only model= and lr= (ALGORITHMS.md §3: RING adaptive_damping, RENG double backprop, R-Kalman
# on its kfac belief), with an ordinary closure and no loss_fn
DEFAULT_LR = {"RING": 0.1, "RENG": 0.01, "RKalman": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEFAULT_LR))
def test_conv_batchnorm_layernorm_with_only_model_and_lr(name, digits):
    import grng_torch

    torch.manual_seed(0)
    model = conv_bn_ln()
    opt = getattr(grng_torch, name)(model.parameters(), model=model, lr=DEFAULT_LR[name])

    def make_closure(x, y):
        def closure():  # the ordinary closure: no loss_fn given to the optimizer
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    history = train(model, opt, make_closure, digits)
    assert max(history) >= TARGET, f"{name}: test accuracy by epoch {history}"
    assert int(opt.group_state(0).core.skipped) == 0  # no step was skipped as non-finite
