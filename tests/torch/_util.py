"""The configuration table and small problems shared by the torch adapter tests.

`OPTIMIZERS` is an OptimizerInfo-style table: one entry per optimizer x structure x GR
estimator (x Fisher), with hyperparameters that make the loss fall on `problem()`; the
shared suite (test_optimizer_suite.py) runs every entry, and every dtype in `DTYPES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grng_torch as gt
import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OptimizerInfo:
    """One configuration: the class, its hyperparameters, and a readable id."""

    cls: type
    kwargs: dict = field(default_factory=dict)
    id: str = ""

    @property
    def structure(self) -> str:
        default = "woodbury" if self.cls is gt.RKalman else "kfac"
        return self.kwargs.get("structure", default)

    def make(self, params, model, loss_fn, **overrides):
        return self.cls(params, model=model, loss_fn=loss_fn, **{**self.kwargs, **overrides})


def _info(cls, **kw) -> OptimizerInfo:
    parts = [cls.__name__] + [f"{k}={v}" for k, v in kw.items() if k not in ("lr", "rho",
                                                                             "damping")]
    return OptimizerInfo(cls, kw, "-".join(parts))


OPTIMIZERS: list[OptimizerInfo] = [
    # RENG: structure x estimator (x fisher)
    _info(gt.RENG, structure="kfac", gr="double_backprop", lr=0.2, damping=1e-2),
    _info(gt.RENG, structure="kfac", gr="finite_difference", lr=0.2, damping=1e-2),
    _info(gt.RENG, structure="kfac", gr="finite_difference", fd_scheme="central",
          fisher="mc", lr=0.2, damping=1e-2),
    _info(gt.RENG, structure="diagonal", gr="double_backprop", lr=0.02, damping=1e-1),
    _info(gt.RENG, structure="diagonal", gr="finite_difference", lr=0.02, damping=1e-1),
    _info(gt.RENG, structure="woodbury", gr="double_backprop", lr=0.2, damping=1e-1),
    _info(gt.RENG, structure="woodbury", gr="finite_difference", fisher="mc", lr=0.2,
          damping=1e-1),
    # RING: structure (x fisher); no GR oracle
    _info(gt.RING, structure="kfac", lr=0.2, damping=1e-2),
    _info(gt.RING, structure="kfac", fisher="mc", lr=0.2, damping=1e-2, momentum=0.5),
    _info(gt.RING, structure="diagonal", lr=0.02, damping=1e-1),
    _info(gt.RING, structure="woodbury", lr=0.2, damping=1e-1),
    # R-Kalman: belief x estimator
    _info(gt.RKalman, structure="woodbury", gr="finite_difference", lr=0.5),
    _info(gt.RKalman, structure="woodbury", gr="double_backprop", lr=0.5),
    _info(gt.RKalman, structure="diagonal", gr="finite_difference", lr=0.5),
    _info(gt.RKalman, structure="kfac", gr="double_backprop", lr=0.2, damping=1e-2),
    _info(gt.RKalman, structure="kfac", gr="finite_difference", lr=0.2, damping=1e-2,
          curvature_every=2, inverse_every=3),
]


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
