"""The OptimizerInfo table and small problems shared by the torch adapter tests.

`OPTIMIZERS` is an OptimizerInfo-style table drawn from the test suites' one table
(tests/cases.py): every optimizer x structure x GR estimator, plus variants (Fisher "mc", a
central finite-difference scheme, momentum, refresh periods), each with hyperparameters that
make the loss fall on `Problem()`; the shared suite (test_optimizer_suite.py) runs every entry,
and every dtype in `DTYPES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tests import cases

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

# this suite's hyperparameters per optimizer x structure (data; the rest are the defaults)
HP = {
    ("reng", "kfac"): dict(lr=0.2, damping=1e-2),
    ("reng", "diagonal"): dict(lr=0.02, damping=1e-1),
    ("reng", "woodbury"): dict(lr=0.2, damping=1e-1),
    ("ring", "kfac"): dict(lr=0.2, damping=1e-2),
    ("ring", "diagonal"): dict(lr=0.02, damping=1e-1),
    ("ring", "woodbury"): dict(lr=0.2, damping=1e-1),
    ("rkalman", "kfac"): dict(lr=0.2, damping=1e-2),
    ("rkalman", "diagonal"): dict(lr=0.5),
    ("rkalman", "woodbury"): dict(lr=0.5),
}
# the entries of a row: one with HP alone ({}) unless listed here, each dict a variant's extra
# keywords (fisher=, fd_scheme= and hyperparameters)
VARIANTS = {
    "reng/kfac/fin_diff": [{}, dict(fd_scheme="central", fisher="mc")],
    "reng/woodbury/fin_diff": [dict(fisher="mc")],
    "ring/kfac/-": [{}, dict(fisher="mc", momentum=0.5)],
    "rkalman/kfac/fin_diff": [dict(curvature_every=2, inverse_every=3)],
}


@dataclass(frozen=True)
class OptimizerInfo:
    """One configuration: a case of tests/cases.py with this suite's hyperparameters."""

    case: cases.Case

    @property
    def kwargs(self) -> dict:
        return dict(self.case.kwargs)

    @property
    def structure(self) -> str:
        return self.case.structure

    @property
    def id(self) -> str:
        extra = [f"{k}={v}" for k, v in self.case.kwargs if k not in ("lr", "rho", "damping")]
        return "-".join([self.case.class_name, self.case.id[len(self.case.optimizer) + 1:],
                         *extra])

    def make(self, params, model, loss_fn, **overrides):
        return self.case.torch(params, model=model, loss_fn=loss_fn, **overrides)


OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo(row.using(**HP[(row.optimizer, row.structure)], **extra))
    for row in cases.select()
    for extra in VARIANTS.get(row.label, [{}])
]


def entry(label: str) -> OptimizerInfo:
    """The entry of a label: 'ring/kfac/-', 'ring/kfac/-+mc', 'reng/kfac/fin_diff:central+mc'."""
    for i in OPTIMIZERS:
        if i.case.label == label:
            return i
    raise KeyError(f"{label!r} not in {[i.case.label for i in OPTIMIZERS]}")


def ids(infos) -> list[str]:
    return [i.id for i in infos]


class Problem:
    """A small 3-class problem: inputs from N(0, I), labels of a random teacher network."""

    def __init__(self, n: int = 96, d: int = 10, classes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g, dtype=torch.float64)
        teacher = torch.randn(d, classes, generator=g, dtype=torch.float64)
        self.y = (self.x @ teacher).argmax(1)
        self.d, self.classes = d, classes

    def model(self, dtype=torch.float32, seed: int = 0, hidden: int = 16) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(self.d, hidden), nn.Tanh(), nn.Linear(hidden, self.classes))
        return m.to(dtype)

    def batches(self, dtype, batch_size: int = 32):
        x = self.x.to(dtype)
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], self.y[i:i + batch_size]


def closure_for(opt, model, loss_fn, x, y):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def full_loss(model, loss_fn, problem, dtype) -> float:
    with torch.no_grad():
        return float(loss_fn(model(problem.x.to(dtype)).float(), problem.y))


def train(opt, model, loss_fn, problem, dtype, steps: int, seed_base: int = 0,
          scheduler=None, batch_size: int = 32) -> list[float]:
    """`steps` steps cycling over the minibatches; torch is seeded before each step (the
    "mc" Fisher samples labels) so two runs of the same steps draw the same numbers."""
    batches = list(problem.batches(dtype, batch_size))
    losses = []
    for k in range(steps):
        torch.manual_seed(1000 + seed_base + k)
        x, y = batches[(seed_base + k) % len(batches)]
        losses.append(float(opt.step(closure_for(opt, model, loss_fn, x, y)).detach()))
        if scheduler is not None:
            scheduler.step()
    return losses


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def state_tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def accumulating_closure(opt, model, loss_fn, x, y, parts: int):
    """A closure over `parts` micro-batches of (x, y), each forward and backward, each loss
    scaled by its share of the batch (gradient accumulation)."""

    def closure():
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
            loss = loss_fn(model(xs), ys) * (xs.shape[0] / x.shape[0])
            loss.backward()
            total = total + loss.detach()
        return total

    return closure


def step_on(opt, model, x, y, closure_free: bool = False):
    """One cross-entropy step on (x, y): through the closure, or closure-free (the loop's own
    backward, then `opt.step()`, as Hugging Face's Trainer does)."""
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    if closure_free:
        closure()
        return opt.step()
    return opt.step(closure)


class TwoHeads(nn.Module):
    """A body and two heads; `forward(x, both=False)` leaves head2 out of the step."""

    def __init__(self, d_in: int = 4, hidden: int = 5, d_out: int = 3):
        super().__init__()
        self.body = nn.Linear(d_in, hidden)
        self.head1, self.head2 = nn.Linear(hidden, d_out), nn.Linear(hidden, d_out)

    def forward(self, x, both=True):
        h = torch.tanh(self.body(x))
        return self.head1(h) + (self.head2(h) if both else 0)


def take_step(opt, closure, closure_free: bool = False):
    """One step: `opt.step(closure)`, or (closure_free) the closure's forward and backward run
    by the loop, then `opt.step()` as Hugging Face's Trainer does."""
    if closure_free:
        closure()
        return opt.step()
    return opt.step(closure)
