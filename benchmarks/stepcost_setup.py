"""The step-cost microbenchmark's fixed setup: its networks (`Net`: the MLP 784-1024-256-10
(ReLU), the width sweep's d-d-10, the default suite's digits MLP 64-128-64-10 (tanh)), their
random batches, the K-FAC-type hyperparameters, the K-FAC layers' factored form, and the
best-of-windows timer."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from benchmarks.models import mlp

SIZES = (784, 1024, 256, 10)
LR, DAMPING = 0.01, 0.1  # every K-FAC-type row (the values do not change the cost)
WOODBURY_LIMIT_BYTES = 2.5e9  # skip woodbury where J (B x N float32) would exceed this
WIDTHS = (256, 512, 1024, 2048)  # the width sweep's d of MLP d-d-10 (batch WIDTH_BATCH)
WIDTH_BATCH = 128
DIGITS_BATCH = 64  # the default suite's digits MLP batch size (benchmarks/tasks.py)


@dataclass(frozen=True)
class Net:
    """A dense MLP of the microbenchmark: widths, activation and the torch device."""

    sizes: tuple
    activation: str = "relu"
    device: str = "cpu"

    @property
    def title(self) -> str:
        return f"MLP {'-'.join(map(str, self.sizes))} ({self.activation})"

    @property
    def n_params(self) -> int:
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def model(self, seed: int = 0):
        torch.manual_seed(seed)
        return mlp(self.sizes, self.activation).to(self.device)

    def batch(self, b: int):
        """A fixed random batch of ``b`` inputs and class targets (seeded by ``b``)."""
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, self.sizes[0], generator=g)
        y = torch.randint(0, self.sizes[-1], (b,), generator=g)
        return x.to(self.device), y.to(self.device)

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU)."""
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()

    def with_device(self, device: str) -> Net:
        return Net(self.sizes, self.activation, device)


MAIN = Net(SIZES)
DIGITS = Net((64, 128, 64, 10), "tanh")
N_PARAMS = MAIN.n_params


def width_net(d: int, device: str = "cpu") -> Net:
    """The width sweep's MLP d-d-10 (ReLU)."""
    return Net((d, d, 10), "relu", device)


def make_model(seed: int = 0):
    return MAIN.model(seed)


def make_batch(b: int):
    """The main MLP's fixed random batch of ``b`` examples (on the CPU)."""
    return MAIN.batch(b)


def kfac_layers(sizes, n: int) -> list[dict]:
    """The K-FAC layers of a dense MLP (bias folded: d_in' = d_in + 1) and whether the core
    picks the factored form for them at ``n`` rows (``grng_core.structures.factored.cheaper``;
    n = the batch size for a dense layer)."""
    try:
        from grng_core.structures.factored import cheaper
    except ImportError:
        return []
    return [{"layer": f"{a}->{b}", "d_out": b, "d_in_ext": a + 1,
             "factored": bool(cheaper(b, a + 1, n))} for a, b in zip(sizes[:-1], sizes[1:])]


def factored_note(layers: list[dict], applies: bool | None) -> str:
    """'784->1024 factored, 1024->256 factored, 256->10 dense' (or why none is)."""
    if applies is None or not layers:
        return ""
    if not applies:
        return "dense S^-1 G A^-1 on every layer (factored form does not apply)"
    return ", ".join(f"{r['layer']} {'factored' if r['factored'] else 'dense'}" for r in layers)


def limit_threads(n: int) -> dict:
    """One intra-op pool size for torch and for the BLAS/LAPACK libraries already loaded
    (NumPy's and SciPy's OpenBLAS, whose LAPACK jaxlib calls: a 2-thread OpenBLAS that spins
    on a shared 2-core machine makes a 1025 x 1025 Cholesky 40x slower), and the environment
    for those loaded later. {library: threads} as set."""
    import os

    torch.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    out = {"torch": torch.get_num_threads()}
    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, which jaxlib's LAPACK uses)
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return out
    threadpool_limits(n)
    out.update({i["internal_api"] + ":" + i["filepath"].rsplit("/", 1)[-1]: i["num_threads"]
                for i in threadpool_info()})
    return out


def time_window(fn, steps: int, repeats: int, sync=None) -> float:
    """Best-of-``repeats`` mean seconds per call over windows of ``steps`` calls; ``sync``
    (the device's wait) runs before and after each window."""
    best = math.inf
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if sync is not None:
            sync()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def not_runnable(e: BaseException) -> str:
    """The table note of a row that failed."""
    msg = " ".join(str(e).split())[:140]
    return f"not runnable: {type(e).__name__}: {msg}"
