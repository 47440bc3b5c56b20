"""Step-cost microbenchmark: ``python -m benchmarks.stepcost`` (or ``python -m benchmarks
--stepcost``).

An MLP 784-1024-256-10 (ReLU) on a fixed random batch of 128 and of 1024 examples. For every
optimizer: the mean time of one training step, relative to AdamW's step and to one plain
forward+backward. Curvature and inverses of every K-FAC-type method are refreshed every
``REFRESH_EVERY`` (10) steps, so a timing window of whole refresh periods gives the amortised
cost. For the GRNG optimizers (and ASDL K-FAC, for comparison) the FLOPs of the optimizer's
own work per step are counted from the shapes of the products that ran
(:class:`benchmarks.flops.MatmulRecorder`, minus the recorded forward+backward) and set against
the machine's measured float32 matmul throughput at those same shapes: efficiency =
(time those products take at the measured throughput) / (step time - forward+backward time).

JAX rows (jitted): ``optax.adamw``, ``grng_jax`` RING kfac and ``kfac-jax`` where it runs,
relative to the jitted forward+backward and the jitted AdamW step.

Each time is the best of ``repeats`` windows (the machine is shared; the minimum is the least
disturbed window). The report goes to <out>/stepcost.md and stepcost.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.environment import load_average, quiet_peer_warnings
from benchmarks.flops import Throughput
from benchmarks.hyperparams import REFRESH_EVERY
from benchmarks.progress import progress_bar
from benchmarks.stepcost_jax import jax_results
from benchmarks.stepcost_report import tables, targets, write
from benchmarks.stepcost_setup import SIZES
from benchmarks.stepcost_torch import measure_batch, torch_rows


def run(batches=(128, 1024), full=False, quick=False, only=None, log=print) -> dict:
    """Every row at every batch size. The rows of one batch size are built and warmed up
    together, then timed round-robin, ``repeats`` windows each, keeping each row's best
    window: a burst of other work on a shared machine then spoils one window of every row
    rather than every window of one row."""
    tp = Throughput()
    rows = torch_rows(full)
    if only:
        rows = [r for r in rows if r[0] in only or r[0] in ("adamw",)]
    res = {"batches": {}, "refresh_every": REFRESH_EVERY, "sizes": SIZES,
           "threads": torch.get_num_threads(), "load_start": load_average(),
           "peak_square_gflops": tp.of(1024, 1024, 1024) / 1e9}
    repeats = 1 if quick else 3
    bar = progress_bar(total=len(batches) * (len(rows) + repeats + 1), unit="task")
    for b in batches:
        periods = 1 if quick or b >= 1024 else 2
        out = measure_batch(b, rows, tp, repeats, periods, bar)
        bar.set_postfix_str(f"b={b} jax", refresh=False)
        out["jax"] = jax_results(b, REFRESH_EVERY * periods, repeats)
        bar.update()
        res["batches"][b] = out
    bar.close()
    res["load_end"] = load_average()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stepcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--quick", action="store_true", help="one window, one refresh period")
    p.add_argument("--full", action="store_true", help="also the heavyball peers")
    p.add_argument("--only", nargs="+", help="row keys (AdamW always runs)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, help="torch threads (default: every core)")
    args = p.parse_args(argv)
    quiet_peer_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    import datetime as _dt

    out = args.out or Path("results") / f"stepcost-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    t0 = time.perf_counter()
    res = run(tuple(args.batches), full=args.full, quick=args.quick, only=args.only)
    path = write(res, out, __doc__)
    print("\n".join(targets(res)))
    print()
    print(tables(res))
    print(f"\nstep-cost report: {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
