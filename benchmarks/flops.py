"""FLOPs counted from shapes, and the machine's float32 matmul throughput at the same shapes.

`MatmulRecorder` is a torch dispatch mode: every matrix product, convolution and dense
factorisation that runs while it is active (forward, backward, the optimizer's own work) is
recorded as an op with its shapes, and its FLOPs are computed from those shapes:

- ``mm`` (m x k) @ (k x n), ``addmm``: 2 m k n;  ``bmm``/``baddbmm`` (b batches): 2 b m k n;
- ``convolution``: 2 * (output elements) * (c_in / groups) * kh * kw; its backward counts the
  input and the weight gradient alike;
- ``cholesky`` of d x d: d^3 / 3;  triangular solve of (d x d) with k right-hand sides: d^2 k;
  ``linalg_solve`` / LU: 2/3 d^3 + 2 d^2 k;  ``linalg_inv``: 2 d^3.

Element-wise work (O(d^2) next to the O(d^3) products) is not counted. The throughput of a
shape is measured by timing ``torch.mm`` on random float32 matrices of that shape; the ideal
time of a recorded op list is sum(flops / throughput) over its ops. For a factorisation the
throughput of the d x d x d product stands in.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _shape(t) -> tuple:
    return tuple(t.shape)


def op_key(func, args, out) -> tuple | None:
    """(kind, dims...) of an op worth counting, or None."""
    name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    try:
        if name == "mm":
            (m, k), (_, n) = _shape(args[0]), _shape(args[1])
            return ("mm", 1, m, k, n)
        if name == "addmm":
            (m, k), (_, n) = _shape(args[1]), _shape(args[2])
            return ("mm", 1, m, k, n)
        if name == "bmm":
            (b, m, k), (_, _, n) = _shape(args[0]), _shape(args[1])
            return ("mm", b, m, k, n)
        if name == "baddbmm":
            (b, m, k), (_, _, n) = _shape(args[1]), _shape(args[2])
            return ("mm", b, m, k, n)
        if name in ("convolution", "convolution_backward"):
            return _conv_key(name, args, out)
        if name in ("linalg_cholesky_ex", "linalg_cholesky", "cholesky"):
            return ("chol", 1, args[0].shape[-1], 0, 0)
        if name == "linalg_solve_triangular":
            a, b = args[0], args[1]
            return ("trsm", 1, a.shape[-1], 0, b.shape[-1] if b.dim() > 1 else 1)
        if name in ("linalg_solve_ex", "linalg_solve", "_linalg_solve_ex"):
            a, b = args[0], args[1]
            return ("solve", 1, a.shape[-1], 0, b.shape[-1] if b.dim() > 1 else 1)
        if name in ("linalg_inv_ex", "linalg_inv", "inverse"):
            return ("inv", 1, args[0].shape[-1], 0, 0)
    except (IndexError, ValueError, AttributeError, TypeError):
        return None
    return None


def _conv_key(name, args, out):
    """("conv", n, positions, c_in/groups * kernel, c_out): n products of the unfolded
    (positions x patch) @ (patch x c_out) shape; positions = batch x output pixels."""
    w = args[1] if name == "convolution" else args[2]
    y = out if name == "convolution" else args[0]  # the output (or its gradient)
    c_out, patch = w.shape[0], w.shape[1] * math.prod(w.shape[2:])
    positions = y.numel() // y.shape[1]
    n = 1
    if name == "convolution_backward":
        mask = args[-1] if isinstance(args[-1], (list, tuple)) else (True, True, True)
        n = int(bool(mask[0])) + int(bool(mask[1]))
    return ("conv", n, positions, patch, c_out)


def op_flops(key: tuple) -> float:
    kind, b, m, k, n = key
    if kind in ("mm", "conv"):
        return 2.0 * b * m * k * n
    d = m
    if kind == "chol":
        return d ** 3 / 3.0
    if kind == "trsm":
        return float(d * d * n)
    if kind == "solve":
        return 2.0 / 3.0 * d ** 3 + 2.0 * d * d * n
    if kind == "inv":
        return 2.0 * d ** 3
    return 0.0


def equivalent_mm(key: tuple) -> tuple[int, int, int]:
    """The (m, k, n) matrix product whose throughput stands in for the op."""
    kind, b, m, k, n = key
    if kind == "mm":
        return (b * m, k, n) if b > 1 else (m, k, n)
    if kind == "conv":
        return (m, k, n)
    return (m, m, m)


class MatmulRecorder(TorchDispatchMode):
    """Counts the ops of `op_key` that run inside ``with MatmulRecorder() as rec:``."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        key = op_key(func, args, out)
        if key is not None:
            self.ops[key] += 1
        return out

    @property
    def flops(self) -> float:
        return total_flops(self.ops)


def total_flops(ops: Counter) -> float:
    return float(sum(op_flops(k) * c for k, c in ops.items()))


def subtract(total: Counter, part: Counter, times: float = 1.0) -> Counter:
    """Ops of ``total`` left after removing ``times`` x ``part`` (a multiset difference)."""
    out = Counter(total)
    for k, c in part.items():
        out[k] -= c * times
    return Counter({k: c for k, c in out.items() if c > 0})


def mlp_fb_flops(sizes, batch: int) -> float:
    """Hand count: forward + backward FLOPs of a dense MLP (the first layer gets no input
    gradient): 6 B sum(d_in d_out) - 2 B d_0 d_1."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    return 6.0 * batch * sum(a * b for a, b in pairs) - 2.0 * batch * sizes[0] * sizes[1]


# ---------------------------------------------------------------------------------------------
# throughput


class Throughput:
    """float32 matmul throughput (FLOP/s) of the machine (or of ``device``, e.g. "cuda"),
    measured per shape and cached."""

    def __init__(self, min_time: float = 0.02, dtype=torch.float32, device="cpu"):
        self.min_time, self.dtype, self.device = min_time, dtype, device
        self.cache: dict = {}

    def _sync(self):
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()

    def _time(self, a, b, reps: int) -> float:
        self._sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        self._sync()
        return time.perf_counter() - t0

    def of(self, m: int, k: int, n: int) -> float:
        key = (m, k, n)
        if key not in self.cache:
            a = torch.randn(m, k, dtype=self.dtype, device=self.device)
            b = torch.randn(k, n, dtype=self.dtype, device=self.device)
            self._time(a, b, 1)
            reps, best = 1, math.inf
            while True:
                dt = self._time(a, b, reps)
                best = min(best, dt / reps)
                if dt >= self.min_time:
                    break
                reps *= 2
            for _ in range(2):  # best of three batches of `reps`
                best = min(best, self._time(a, b, reps) / reps)
            self.cache[key] = 2.0 * m * k * n / best
        return self.cache[key]

    def ideal_time(self, ops: Counter) -> float:
        """Seconds the ops would take at the measured throughput of their own shapes."""
        t = 0.0
        for key, c in ops.items():
            f = op_flops(key)
            if f <= 0:
                continue
            t += c * f / self.of(*equivalent_mm(key))
        return t
