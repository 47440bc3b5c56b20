"""The suite: every (task, optimizer) pair's hyperparameter sweep, the selection of its best
setting, and that setting on every seed.

Hyperparameters: every optimizer's sweep (``OptSpec.sweep_grid``) runs on seed 0; the setting with
the best *validation* metric (mean over the last epoch's evaluations) is then run on every seed.
The test metric is never used to choose.
"""

from __future__ import annotations

import math

from benchmarks.harness import run_one
from benchmarks.peak_memory import PeakRSS
from benchmarks.progress import progress_bar
from benchmarks.run_result import RunResult


def best_of(task, runs: list[RunResult]) -> RunResult | None:
    """The sweep run with the best validation metric averaged over its last epoch's
    evaluations (ties: lower final train loss)."""
    ok = [r for r in runs if r.status == "ok" and math.isfinite(r.select_valid)]
    if not ok:
        return None
    sign = -1.0 if task.higher_is_better else 1.0
    return min(ok, key=lambda r: (sign * r.select_valid, r.final_loss))


def runs_here(task, spec) -> bool:
    """Whether ``spec`` runs on ``task`` (its own task list, and the task's preset rows)."""
    return (spec.tasks is None or task.name in spec.tasks) and \
        (task.rows is None or spec.key in task.rows)


def steps_for(task, spec, preset, seeds) -> int:
    seeds = task.seeds or seeds
    return (len(spec.sweep_grid(preset, task)) + max(0, seeds - 1)) * task.epochs * \
        task.n_steps_per_epoch()


def run_suite(tasks, specs, preset: str, seeds: int, log=print, progress=True):
    """All runs; returns (results: list[RunResult], info: dict)."""
    info = {"unavailable": {}, "preset": preset, "seeds": seeds, "selected": {}}
    plan = [(t, s) for t in tasks for s in specs if runs_here(t, s)]
    total = sum(steps_for(t, s, preset, seeds) for t, s in plan)
    bar = progress_bar(total=total, unit="step", disable=not progress)
    mem = PeakRSS()
    results: list[RunResult] = []
    for task in tasks:
        chosen = []
        task_seeds = task.seeds or seeds
        for spec in specs:
            if not runs_here(task, spec):
                continue
            hp = _sweep_and_select(task, spec, preset, task_seeds, bar, mem, info, results)
            if hp is not None:
                chosen.append((spec, hp))
        # the other seeds round-robin over the optimizers (seed-major), so that a burst of
        # other work on a shared machine does not land on one optimizer's runs only
        for seed in range(1, task_seeds):
            for spec, hp in chosen:
                bar.set_postfix_str(f"{task.name} seed {seed} {spec.key}", refresh=False)
                results.append(run_one(task, spec, hp, seed, task.epochs, progress=bar,
                                       mem=mem))
    bar.close()
    return results, info


def _sweep_and_select(task, spec, preset: str, seeds: int, bar, mem: PeakRSS, info: dict,
                      results: list[RunResult]) -> dict | None:
    """Run ``spec``'s sweep on seed 0 (appended to ``results``) and return the selected
    setting; None where the optimizer is missing, cannot run, or no setting ended well
    (``info`` records which)."""
    key = f"{task.name}/{spec.key}"
    n_steps = steps_for(task, spec, preset, seeds)
    missing = spec.missing()
    if missing:
        info["unavailable"][key] = f"not installed: {', '.join(missing)}"
        bar.update(n_steps)
        return None
    bar.set_postfix_str(f"{task.name} {spec.key}", refresh=False)
    sweep: list[RunResult] = []
    failed = None
    for hp in spec.sweep_grid(preset, task):
        r = run_one(task, spec, hp, 0, task.epochs, progress=bar, mem=mem)
        r.sweep = True
        sweep.append(r)
        if r.status.startswith("error") and r.steps == 0:
            failed = r.status
            break
    results.extend(sweep)
    if failed:
        info["unavailable"][key] = f"not runnable ({_versions(spec.requires)}): {failed}"
        bar.update(max(0, n_steps - task.epochs * task.n_steps_per_epoch()))
        return None
    best = best_of(task, sweep)
    if best is None:
        bar.update(max(0, seeds - 1) * task.epochs * task.n_steps_per_epoch())
        info["selected"][key] = None
        return None
    info["selected"][key] = best.hp
    return best.hp


def final_runs(results: list[RunResult], info: dict) -> list[RunResult]:
    """The runs of the selected setting of each (task, optimizer): the seed-0 sweep run with
    that setting plus the other seeds."""
    out = []
    for r in results:
        sel = info["selected"].get(f"{r.task}/{r.opt}")
        if sel is None:
            continue
        if r.hp == sel and (not r.sweep or r.seed == 0):
            out.append(r)
    return out


def _versions(modules) -> str:
    """'pkg x.y, ...' of the distributions behind the modules (for error messages)."""
    import importlib.metadata as md

    dists = {"asdl": "asdfghjkl", "pytorch_optimizer": "pytorch-optimizer", "ivon": "ivon-opt",
             "kfac_jax": "kfac-jax", "grng_torch": "grng", "grng_core": "grng",
             "grng_jax": "grng"}
    out = []
    for m in modules:
        name = dists.get(m, m)
        try:
            v = md.version(name)
        except md.PackageNotFoundError:
            v = "?"
        if f"{name} {v}" not in out:
            out.append(f"{name} {v}")
    return ", ".join(out)
