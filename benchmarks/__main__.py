"""``python -m benchmarks``: the GRNG benchmark suite (run from the repository root).

    python -m benchmarks            # default: digits MLP (every optimizer, sweep, 5 seeds),
                                    # ResNet-BN and GPT-2 char LM (GRNG at its defaults,
                                    # AdamW and ASDL K-FAC swept; 2 seeds)
    python -m benchmarks --quick    # smoke run, under 2 minutes on a 2-core CPU
    python -m benchmarks --full     # every task, heavyball peers, bigger sweep, 5 seeds
    python -m benchmarks --stepcost # also the step-cost microbenchmark (benchmarks.stepcost)

The report (report.md, results.json, PNG plots) goes to results/<name or timestamp>/; the main
table is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from pathlib import Path

from benchmarks.environment import environment, load_average, quiet_peer_warnings
from benchmarks.tasks import TASK_NAMES

#: The rows of the default suite's real tasks (ResNet-BN, GPT-2; 2 seeds, to stay under 10
#: minutes on 2 cores): the GRNG optimizers at their recommended setting and the two
#: optimizers issue #15's targets compare them with, swept. ``--full`` runs every row, 5 seeds.
DEFAULT_REAL_ROWS = ("reng_rec", "ring_rec", "ring_rec_gn", "rkalman_rec", "adamw", "asdl_kfac")

PRESETS = {
    # tasks, seeds, epochs override (None = the task's own), and the real tasks' seeds and rows
    # (None: every row, the preset's seeds)
    "quick": {"tasks": ["digits_mlp"], "seeds": 2, "epochs": 6},
    "default": {"tasks": ["digits_mlp", "resnet_bn", "gpt2_char"], "seeds": 5, "epochs": None,
                "real_seeds": 2, "real_rows": DEFAULT_REAL_ROWS},
    "full": {"tasks": ["digits_mlp", "digits_cnn", "resnet_bn", "logreg", "char_lm",
                       "gpt2_char"], "seeds": 5, "epochs": None},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke run (< 2 min)")
    g.add_argument("--full", action="store_true", help="every task and peer")
    p.add_argument("--tasks", nargs="+", help="task names (" + " ".join(TASK_NAMES) + ")")
    p.add_argument("--optimizers", nargs="+", help="optimizer keys (default: the preset's)")
    p.add_argument("--seeds", type=int, help="number of seeds")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the task's)")
    p.add_argument("--subset", type=int, help="use only the first N training examples")
    p.add_argument("--out", type=Path, help="output folder (default results/<name>)")
    p.add_argument("--name", help="results sub-folder name (default: preset + timestamp)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stepcost", action="store_true",
                   help="also run the step-cost microbenchmark (python -m benchmarks.stepcost)")
    p.add_argument("--stepcost-only", action="store_true", help="only the microbenchmark")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the suite (default 1: the models are small, "
                        "and one thread is steadier on a shared machine; the step-cost "
                        "benchmark gets the same)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_peer_warnings()
    preset = "quick" if args.quick else "full" if args.full else "default"
    cfg = PRESETS[preset]
    name = args.name or f"{preset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    outdir = args.out or Path("results") / name
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    env = environment(args.threads)
    t_start = time.perf_counter()
    if not args.stepcost_only:
        from benchmarks.optimizers import select_specs
        from benchmarks.report import write_report
        from benchmarks.suite import run_suite
        from benchmarks.tasks import REAL_TASKS, make_task

        tasks = [make_task(t, subset=args.subset) for t in (args.tasks or cfg["tasks"])]
        for t in tasks:
            if args.epochs or cfg["epochs"]:
                t.epochs = args.epochs or cfg["epochs"]
            if t.name in REAL_TASKS and cfg.get("real_rows") and not args.optimizers:
                t.rows = cfg["real_rows"]
            if t.name in REAL_TASKS and cfg.get("real_seeds") and not args.seeds:
                t.seeds = cfg["real_seeds"]
        specs = select_specs(preset, args.optimizers)
        seeds = args.seeds or cfg["seeds"]
        print(f"GRNG benchmark [{preset}]: {len(tasks)} task(s) x {len(specs)} optimizers x "
              f"{seeds} seed(s) (" + ", ".join(
                  f"{t.name}: {len(t.rows)} rows x {t.seeds} seeds" for t in tasks
                  if t.rows and t.seeds) + f") -> {outdir}", flush=True)
        results, info = run_suite(tasks, specs, preset, seeds,
                                  progress=not args.no_progress)
        env["suite wall time"] = f"{time.perf_counter() - t_start:.1f} s"
        env["load average at end"] = load_average()
        report, table = write_report(results, info, tasks, specs, outdir, env, command,
                                     plots=not args.no_plots)
        print()
        print(table)
        print()
        for k, v in info["unavailable"].items():
            print(f"not run: {k}: {v}")
        print(f"report: {report}  ({env['suite wall time']})")
    if args.stepcost or args.stepcost_only:
        from benchmarks import stepcost

        sc_args = ["--out", str(outdir), "--threads", str(args.threads)] + (
            ["--quick"] if preset == "quick" else [])
        stepcost.main(sc_args)
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
