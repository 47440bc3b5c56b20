"""A quick look at candidate settings on one benchmark task: each setting (a benchmark row's
key and hyperparameters) trained for the task's default epochs from the given seeds, one line
per run: steps and seconds to the target, final validation and test metric, mean step time and
the validation metric along the run. For exploring settings before a suite run (README
"Momentum on language models"); not a report.

    python -m benchmarks.settings_probe gpt2_char \\
        '{"defaults": {"form": "gauss_newton"},
          "m5": {"form": "gauss_newton", "momentum": 0.5, "kl_clip": 3e-4}}' \\
        --seeds 0,1

A setting may name its row with "_spec" (default "ring_rec_gn"; e.g. "adamw" with its "lr"
and "weight_decay").
"""

from __future__ import annotations

import argparse
import json
import warnings


def main(argv=None) -> None:
    import torch

    from benchmarks import grng_runs, torch_runs
    from benchmarks.harness import run_one
    from benchmarks.tasks import make_task

    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("settings", help='JSON {label: {hyperparameter: value, "_spec": row}}')
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    task = make_task(args.task)
    rows = {s.key: s for s in grng_runs.specs() + torch_runs.specs()}
    for label, hp in json.loads(args.settings).items():
        spec = rows[hp.pop("_spec", "ring_rec_gn")]
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_one(task, spec, dict(hp), seed, task.epochs)
            curve = [round(h["valid"], 3) for h in r.history][::3]
            print(f"{label:20s} seed {seed} steps to target {r.steps_to_target} "
                  f"({r.time_to_target:.2f} s) valid {r.final_valid:.3f} test {r.final_test:.3f} "
                  f"step {1e3 * r.step_time:.1f} ms {r.status} valid along the run {curve}",
                  flush=True)


if __name__ == "__main__":
    main()
