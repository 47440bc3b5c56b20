"""The step-cost microbenchmark's fixed setup: the MLP 784-1024-256-10 (ReLU), its random
batches, the K-FAC-type hyperparameters, and the best-of-windows timer."""

from __future__ import annotations

import math
import time

import torch

from benchmarks.models import mlp

SIZES = (784, 1024, 256, 10)
N_PARAMS = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
LR, DAMPING = 0.01, 0.1  # every K-FAC-type row (the values do not change the cost)
WOODBURY_LIMIT_BYTES = 2.5e9  # skip woodbury where J (B x N float32) would exceed this


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    return mlp(SIZES, "relu")


def make_batch(b: int):
    """A fixed random batch of ``b`` inputs and class targets (seeded by ``b``)."""
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (b,), generator=g)


def time_window(fn, steps: int, repeats: int) -> float:
    """Best-of-``repeats`` mean seconds per call over windows of ``steps`` calls."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def not_runnable(e: BaseException) -> str:
    """The table note of a row that failed."""
    msg = " ".join(str(e).split())[:140]
    return f"not runnable: {type(e).__name__}: {msg}"
