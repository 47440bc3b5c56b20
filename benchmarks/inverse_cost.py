"""Cost of one K-FAC inverse refresh per `inverse_method` (ALGORITHMS.md §2.1).

    python -m benchmarks.inverse_cost [--sizes 257,785,1025] [--batch 128] [--repeats 3]

For each factor size d: A = aᵀa/n + 1e-2·I from a batch of n rows, then the factor after one
more EMA update (β = 0.95, a fresh batch) — what a refresh sees. Each method inverts the new
factor, Newton–Schulz warm-started from the previous factor's inverse (as the optimizer does);
the table gives the mean time and the error against numpy.linalg.inv. torch, one CPU thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

METHODS = ("cholesky", "eigh", "newton_schulz")


def _factors(d: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float32)
    b = torch.randn(n, d, generator=g, dtype=torch.float32)
    eye = torch.eye(d)
    old = a.T @ a / n + 1e-2 * eye
    new = 0.95 * old + 0.05 * (b.T @ b / n + 1e-2 * eye)
    return old, new


def measure(d: int, n: int, repeats: int) -> list[tuple[str, float, float]]:
    """(method, mean seconds, relative error vs numpy.linalg.inv) for one size."""
    import array_api_compat
    import torch

    from grng_core.linalg import default_tol, spd_inverse

    old, new = _factors(d, n)
    xp = array_api_compat.array_namespace(new)
    warm = torch.linalg.inv(old)
    ref = np.linalg.inv(new.double().numpy())
    tol = default_tol(new.dtype, xp)
    rows = []
    for method in METHODS:
        spd_inverse(new, xp, method=method, warm=warm, tol=tol, max_iter=50)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            X = spd_inverse(new, xp, method=method, warm=warm, tol=tol, max_iter=50)
        seconds = (time.perf_counter() - t0) / repeats
        err = float(np.linalg.norm(X.double().numpy() - ref) / np.linalg.norm(ref))
        rows.append((method, seconds, err))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inverse_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="257,785,1025")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print("| d | method | ms per refresh | rel. error vs numpy.linalg.inv |")
    print("| ---: | --- | ---: | ---: |")
    for d in (int(s) for s in args.sizes.split(",")):
        for method, seconds, err in measure(d, args.batch, args.repeats):
            print(f"| {d} | {method} | {seconds * 1e3:.1f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
