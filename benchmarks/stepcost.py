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
The K-FAC rows list their layers and whether the core takes the factored form for them at
that batch size (``grng_core.structures.factored.cheaper(d_out, d_in + 1, n)``, n the batch
size, times 2 or 3 where a finite-difference ĝ stacks the shifted passes' rows).

Also: the width sweep (MLP d-d-10, batch 128, ``--widths``: RING kfac, ASDL K-FAC and AdamW;
a log-log plot stepcost_widths.png) and the default suite's digits MLP 64-128-64-10 (tanh,
batch 64: RING kfac against ASDL K-FAC); RING in its default form and in the gauss_newton form.

JAX rows (jitted): ``optax.adamw``, ``grng_jax`` RING kfac, the same RING written by hand in
jax.numpy (`benchmarks.stepcost_jaxref`) and ``kfac-jax`` where it runs, relative to the
jitted forward+backward and the jitted AdamW step; the RING rows also time two refresh
periods step by step, several windows (the costliest step position that refreshes nothing,
its least disturbed call, against the median position).

Torch and the BLAS/LAPACK libraries (NumPy's, SciPy's OpenBLAS: jaxlib's LAPACK) run one
thread by default (``--threads``; XLA keeps its own thread pool for its matmuls), on the CPU
or, with ``--device cuda``, on the GPU (torch rows; JAX uses its default backend then). Each
time is the best of ``repeats`` windows, the rows of one setting timed round-robin (the machine
is shared; the minimum is the least disturbed window). The report, with issue #11's targets
met or not, goes to <out>/stepcost.md and stepcost.json. Benchmarks measure: a target that is
not met is reported, never an error.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.environment import load_average, quiet_peer_warnings
from benchmarks.flops import Throughput
from benchmarks.hyperparams import REFRESH_EVERY
from benchmarks.progress import progress_bar
from benchmarks.stepcost_report import tables, targets, write
from benchmarks.stepcost_setup import DIGITS, DIGITS_BATCH, MAIN, WIDTHS, limit_threads
from benchmarks.stepcost_torch import measure_batch, torch_rows
from benchmarks.stepcost_width import WIDTH_KEYS, width_results

DIGITS_KEYS = WIDTH_KEYS  # AdamW, ASDL and both RING forms


def _ring_form() -> str:
    try:
        from grng_core.config import RINGConfig
    except ImportError:
        return "–"
    return str(RINGConfig.defaults().get("form", "gauss_newton"))


def run(batches=(128, 1024), full=False, quick=False, only=None, log=print, widths=WIDTHS,
        device="cpu", jax=True) -> dict:
    """Every row at every batch size, the width sweep and the digits pair. The rows of one
    setting are built and warmed up together, then timed round-robin, ``repeats`` windows
    each, keeping each row's best window: a burst of other work on a shared machine then
    spoils one window of every row rather than every window of one row."""
    from benchmarks.stepcost_jax import jax_results

    tp = Throughput(device=device)
    rows = torch_rows(full)
    if only:
        rows = [r for r in rows if r[0] in only or r[0] in ("adamw",)]
    net = MAIN.with_device(device)
    title = net.title if batches else "width sweep and digits MLP"
    res = {"batches": {}, "refresh_every": REFRESH_EVERY, "sizes": net.sizes, "title": title,
           "threads": torch.get_num_threads(), "device": device, "ring_form": _ring_form(),
           "load_start": load_average(), "peak_square_gflops": tp.of(1024, 1024, 1024) / 1e9}
    repeats = 1 if quick else 3
    small = [r for r in rows if r[0] in DIGITS_KEYS]
    wide = [r for r in rows if r[0] in WIDTH_KEYS]
    bar = progress_bar(unit="task", total=len(batches) * (len(rows) + repeats + int(jax))
                       + (len(widths) + 1) * (len(wide) + repeats))
    for b in batches:
        periods = 1 if quick or b >= 1024 else 2
        out = measure_batch(b, rows, tp, repeats, periods, bar, net=net)
        if jax:
            bar.set_postfix_str(f"b={b} jax", refresh=False)
            out["jax"] = jax_results(b, REFRESH_EVERY * periods, repeats)
            bar.update()
        res["batches"][b] = out
    if wide and widths:
        res["widths"] = width_results(widths, wide, tp, repeats, 1, bar, device)
    if small:  # ~1 ms steps: more periods per window steady the small model's timing
        res["digits"] = measure_batch(DIGITS_BATCH, small, tp, repeats, 1 if quick else 5, bar,
                                      net=DIGITS.with_device(device), hvp=False)
    bar.close()
    res["jax_backend"] = _jax_backend() if jax else "not run"
    res["load_end"] = load_average()
    return res


def _jax_backend() -> str:
    try:
        import jax
    except ImportError:
        return "not installed"
    return jax.default_backend()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stepcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="*", default=[128, 1024],
                   help="batch sizes of the main MLP (default 128 1024; none: skip it)")
    p.add_argument("--widths", type=int, nargs="*", default=list(WIDTHS),
                   help="d of the width sweep's MLP d-d-10 (default 256 512 1024 2048; none: "
                        "no sweep)")
    p.add_argument("--quick", action="store_true", help="one window, one refresh period")
    p.add_argument("--full", action="store_true", help="also the heavyball peers")
    p.add_argument("--only", nargs="+", help="row keys (AdamW always runs)")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX rows")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of torch and of the loaded BLAS/LAPACK libraries "
                        "(default 1; 0: their defaults, every core)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the rows: cpu (default) or cuda; JAX takes the CPU "
                        "with cpu and its default backend otherwise")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    quiet_peer_warnings()
    pools = limit_threads(args.threads) if args.threads > 0 else {}
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__})")
        return 2
    import datetime as _dt

    out = args.out or Path("results") / f"stepcost-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    t0 = time.perf_counter()
    res = run(tuple(args.batches), full=args.full, quick=args.quick, only=args.only,
              widths=tuple(args.widths), device=args.device, jax=not args.no_jax)
    res["thread_pools"] = pools
    path = write(res, out, __doc__)
    print("\n".join(targets(res)))
    print()
    print(tables(res))
    print(f"\nstep-cost report: {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
