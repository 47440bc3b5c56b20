"""`python -m grng_core.consistency`: the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from grng_core.consistency.backends import ALL_BACKENDS, available_backends, gpu_available
from grng_core.consistency.cases import default_configs, quick_configs
from grng_core.consistency.report import DEFAULT_STEPS, FLOAT32_TOL, FLOAT64_TOL, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    return _run(ap, args)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grng_core.consistency",
        description="Train the reference MLP with every optimizer on every installed array "
                    "backend and print the largest relative difference per backend pair; "
                    "exit status 1 above the tolerance.")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps (default {DEFAULT_STEPS}, 5 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="a fast check: 6 representative configurations (every optimizer, "
                         "structure and estimator at least once), 5 steps, hidden width 8, "
                         "batch 16")
    ap.add_argument("--backends", default=None,
                    help="comma-separated subset of: " + ", ".join(ALL_BACKENDS)
                         + " (default: every installed one; cupy needs a GPU)")
    ap.add_argument("--optimizers", default=None,
                    help="comma-separated subset of ring, reng, rkalman (default: all)")
    ap.add_argument("--tol", type=float, default=None,
                    help=f"tolerance (default {FLOAT64_TOL:g} in float64, {FLOAT32_TOL:g} in "
                         "float32)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true", help="print each run's time")
    return ap


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:

    steps = args.steps if args.steps is not None else (5 if args.quick else DEFAULT_STEPS)
    hidden = args.hidden if args.hidden is not None else (8 if args.quick else 16)
    batch = args.batch_size if args.batch_size is not None else (16 if args.quick else 32)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in ALL_BACKENDS]
        if unknown:
            ap.error(f"unknown backends {unknown}; known: {', '.join(ALL_BACKENDS)}")
        if "cupy" in backends and not gpu_available():
            ap.error("backend cupy needs CuPy and a CUDA GPU")
    else:
        backends = available_backends()
    configs = quick_configs() if args.quick else default_configs()
    if args.optimizers:
        wanted = {o.strip() for o in args.optimizers.split(",") if o.strip()}
        bad = wanted - {"ring", "reng", "rkalman"}
        if bad:
            ap.error(f"unknown optimizers {sorted(bad)}")
        configs = [c for c in configs if c.optimizer in wanted]
    if steps < 1:
        ap.error("--steps must be >= 1")
    if len(backends) < 2:
        print(f"only {backends or 'no backend'} installed: nothing to compare")
        return 0
    progress = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None
    t0 = time.perf_counter()
    report = run(backends, configs, steps, args.dtype, args.tol, hidden, batch, args.seed,
                 progress)
    print(f"grng_core.consistency: {len(configs)} configurations x {len(backends)} backends, "
          f"{steps} steps, {args.dtype}, MLP {(64, hidden, 10)} batch {batch}, "
          f"{time.perf_counter() - t0:.0f}s")
    print(report.table())
    print(report.summary())
    return 0 if report.passed else 1
