"""The suite's report: markdown tables (mean ± std over seeds), the summary (which RING form
reaches each task's target first, the digits target), plots and a JSON dump."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from benchmarks.formatting import finite, fmt_num, fmt_pm, markdown_table
from benchmarks.hyperparams import GN_SUFFIX, SWEEPS
from benchmarks.plots import plot_grad_norm, plot_task
from benchmarks.ring_forms import ring_form_lines
from benchmarks.run_result import RunResult, group_runs
from benchmarks.suite import final_runs
from benchmarks.targets import recommended_lines, winner_lines


def summary_rows(runs: list[RunResult], metric_name: str = "test") -> list[dict]:
    """One dict per (task, optimizer) with the aggregated measurements."""
    rows = []
    for (task, opt), rs in group_runs(runs).items():
        ok = [r for r in rs if r.status == "ok"]
        reached = [r for r in ok if math.isfinite(r.time_to_target)]
        rows.append({
            "task": task, "opt": opt, "label": rs[0].label, "n": len(rs), "ok": len(ok),
            "hp": rs[0].hp,
            "test": [r.final_test for r in ok],
            "valid": [r.select_valid for r in ok],
            "loss": [r.final_loss for r in ok],
            "ttt": [r.time_to_target for r in reached], "reached": len(reached),
            "stt": [r.steps_to_target for r in reached],
            "step_ms": [r.step_time * 1e3 for r in rs if math.isfinite(r.step_time)],
            "fb_ms": [r.fb_time * 1e3 for r in rs if math.isfinite(r.fb_time)],
            "opt_ms": [r.opt_time * 1e3 for r in rs if math.isfinite(r.opt_time)],
            "mem": [r.peak_mem_mb for r in rs],
            "gnorm": [r.grad_norm for r in ok],
            "mean_gnorm": [r.mean_grad_norm for r in ok],
            "status": sorted({r.status for r in rs}),
        })
    return rows


def format_hp(hp: dict, keys=("lr", "damping", "rho")) -> str:
    """The swept values of a setting; "defaults" for a row run at the library's defaults."""
    return ", ".join(f"{k}={hp[k]:g}" for k in keys if k in hp) or "defaults"


def results_table(rows: list[dict], metric: str) -> str:
    mname = "acc" if metric == "accuracy" else "bpc"
    headers = ["optimizer", "selected", f"test {mname}", f"valid {mname}", "time to target (s)",
               "steps to target", "reached",
               "step (ms)", "fwd+bwd (ms)", "opt overhead (ms)", "peak mem (MiB)",
               "mean ‖g‖ (train)", "final grad norm", "final train loss"]
    body = []
    for r in rows:
        status = "" if r["ok"] == r["n"] else f" ({r['n'] - r['ok']} failed/diverged)"
        body.append([
            r["label"] + status, format_hp(r["hp"]), fmt_pm(r["test"], 4), fmt_pm(r["valid"], 4),
            fmt_pm(r["ttt"], 2), fmt_pm(r["stt"], 0), f"{r['reached']}/{r['n']}",
            fmt_pm(r["step_ms"], 2), fmt_pm(r["fb_ms"], 2), fmt_pm(r["opt_ms"], 2),
            fmt_pm(r["mem"], 2), fmt_pm(r["mean_gnorm"], 4), fmt_pm(r["gnorm"], 4),
            fmt_pm(r["loss"], 4),
        ])
    return markdown_table(headers, body)


def sweep_table(results: list[RunResult], task: str, metric: str) -> str:
    rows = []
    for r in results:
        if r.task != task or not r.sweep:
            continue
        rows.append([r.label, format_hp(r.hp), fmt_num(r.select_valid, 4),
                     fmt_num(r.final_test, 4), fmt_num(r.final_loss, 4), r.status])
    return markdown_table(["optimizer", "setting", "valid (last epoch)", "final test",
                           "final train loss", "status"], rows)


# ---------------------------------------------------------------------------------------------
# targets


def digits_targets(rows: list[dict]) -> list[str]:
    """The issue's digits-MLP target: some GRNG optimizer reaches the target accuracy sooner
    than AdamW and the K-FAC peer, and ends with a smaller gradient norm than AdamW."""
    by = {r["opt"]: r for r in rows if r["task"] == "digits_mlp"}
    if not by:
        return []

    def mean(v):
        v = finite(v)
        return float(np.mean(v)) if v else math.nan

    def ttt(r):  # not reached by every seed counts as infinitely slow
        return mean(r["ttt"]) if r["reached"] == r["n"] and r["n"] else math.inf

    lines = []
    adam, kfac = by.get("adamw"), by.get("asdl_kfac")
    if adam is None:
        return ["- digits MLP: AdamW did not run, the target cannot be checked."]
    a_t, a_g = ttt(adam), mean(adam["gnorm"])
    k_t = ttt(kfac) if kfac else math.nan
    met_any = False
    for key in ("reng", "ring", "ring" + GN_SUFFIX, "rkalman", "ngd"):
        r = by.get(key)
        if r is None:
            continue
        t, g = ttt(r), mean(r["gnorm"])
        faster_a = t < a_t
        faster_k = (t < k_t) if kfac else True
        smaller_g = g < a_g
        met = faster_a and faster_k and smaller_g and key != "ngd"
        met_any |= met
        lines.append(
            f"- {r['label']}: time to target {_t(t)} vs AdamW {_t(a_t)} "
            f"({_ratio(t, a_t)}) and K-FAC (ASDL) {_t(k_t)} ({_ratio(t, k_t)}); "
            f"final grad norm {fmt_num(g, 4)} vs AdamW {fmt_num(a_g, 4)} "
            f"({_ratio(g, a_g)}) -> {'MET' if met else 'not met'}"
            + (" (NGD is the rho=0 baseline, not counted)" if key == "ngd" else ""))
    lines.insert(0, f"- **Target (digits MLP): {'MET' if met_any else 'NOT MET'}** - at least "
                    "one GRNG optimizer reaches the target accuracy in less wall time than "
                    "AdamW and K-FAC (ASDL) and ends with a smaller gradient norm than AdamW "
                    "(means over seeds; a run that misses the target counts as infinitely "
                    "slow).")
    return lines


def _t(t):
    return "never" if not math.isfinite(t) else f"{t:.2f} s"


def _ratio(a, b):
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


# ---------------------------------------------------------------------------------------------
# the whole report


def write_report(results: list[RunResult], info: dict, tasks, specs, outdir: Path,
                 env: dict, command: str, plots: bool = True) -> tuple[Path, str]:
    """Write report.md, results.json and the plots; returns (report path, the main table(s))."""
    outdir.mkdir(parents=True, exist_ok=True)
    fin = final_runs(results, info)
    rows = summary_rows(fin)
    md = [f"# GRNG benchmark report ({info['preset']})", "",
          f"Command: `{command}`", ""]
    md += [f"- {k}: {v}" for k, v in env.items()]
    md.append("")
    summary = summary_section(tasks, rows)
    md += summary
    tables = []
    for task in tasks:
        section, table = task_section(task, rows, results, fin, info, outdir, plots)
        md += section
        tables.append(f"### {task.title}\n\n{table}")
    if info["unavailable"]:
        md += ["## Not run", ""]
        md += [f"- {k}: {v}" for k, v in info["unavailable"].items()]
        md.append("")
    md += optimizers_section(specs) + method_section(info["preset"])
    report = outdir / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    (outdir / "results.json").write_text(json.dumps(
        {"info": info, "env": env, "command": command,
         "runs": [r.to_dict() for r in results]}, indent=1, default=_json_default),
        encoding="utf-8")
    return report, "\n\n".join(tables) + "\n\n" + "\n".join(summary).strip()


def task_section(task, rows: list[dict], results: list[RunResult], fin: list[RunResult],
                 info: dict, outdir: Path, plots: bool) -> tuple[list[str], str]:
    """(markdown lines of one task's section, its results table): data, target, the table,
    the targets (RING forms; digits), the plots and the sweep."""
    trows = [r for r in rows if r["task"] == task.name]
    md = [f"## {task.title}", ""]
    narrowed = "".join(f" Sweep narrowed here: {k} x {', '.join(f'{m:.3g}' for m in v)}."
                       for k, v in task.sweep.items())
    md.append(f"Data: {task.meta.get('data', '')}. Batch {task.batch_size}, "
              f"{task.epochs} epochs of {task.n_steps_per_epoch()} steps, "
              f"{task.seeds or info['seeds']} seeds. Target: test "
              f"{'accuracy >=' if task.higher_is_better else 'bits/char <='} "
              f"{task.target:g}.{narrowed}")
    md.append("")
    table = results_table(trows, task.metric)
    md += [table, ""]
    md += ["**Targets**", ""] + (ring_form_lines(rows, task) or ["- no RING row ran."])
    md += winner_lines(rows, task) + recommended_lines(rows, task)
    if task.name == "digits_mlp":
        md += digits_targets(rows)
    md.append("")
    if plots:
        for plot, name in ((plot_task, task.name), (plot_grad_norm, f"{task.name}_grad_norm")):
            p = plot(fin, task, outdir / f"{name}.png")
            md += [f"![{name}]({p.name})" if p is not None else
                   f"(no {name} plot: matplotlib is not installed, or nothing to plot)", ""]
    md += ["<details><summary>Sweep (seed 0)</summary>", "",
           sweep_table(results, task.name, task.metric), "", "</details>", ""]
    return md, table


def summary_section(tasks, rows: list[dict]) -> list[str]:
    """Per task: which RING form reaches the target first (and by how much), and the digits
    target's verdict."""
    md = ["## Summary", "",
          "Per task: the winner (the smallest mean training wall time to the target, among "
          "the rows that reached it on every seed); issue #15's target, judged on the GRNG "
          "optimizers at their defaults (the best of them reaches the target in less wall "
          "time than AdamW and than ASDL's K-FAC, with a final validation metric at least as "
          "good as AdamW's, and no run diverges); which RING form reaches the target first (a "
          "form that reaches it on more seeds is first, then the smaller mean wall time; means "
          "over the seeds that reached it; steps likewise).", ""]
    for task in tasks:
        md.append(f"**{task.title}**")
        md.append("")
        md += winner_lines(rows, task) + recommended_lines(rows, task)
        md += ring_form_lines(rows, task) or ["- no RING row ran."]
        if task.name == "digits_mlp":  # the earlier digits target: also a smaller grad norm
            md += digits_targets(rows)[:1]
        md.append("")
    return md


def optimizers_section(specs) -> list[str]:
    md = ["## Optimizers", ""]
    for s in specs:
        base = ", ".join(f"{k}={v}" for k, v in s.base.items())
        md.append(f"- **{s.label}** (`{s.key}`, {s.framework}): base {base}"
                  + (f"; {s.note}" if s.note else ""))
    return md


def method_section(preset: str) -> list[str]:
    grid = SWEEPS[preset]
    return ["", "## Method", "",
            f"- Sweep: lr x {', '.join(f'{m:.3g}' for m in grid['lr'])}"
            f" and damping x {', '.join(f'{m:.3g}' for m in grid['damping'])} (where the "
            "optimizer has one) around each base value, on seed 0; the setting with the best "
            "validation metric (mean over the last epoch's evaluations) runs on every seed "
            "(seed-major, round-robin over the optimizers). The test metric never selects.",
            "- Table values: mean ± sample std over seeds of the selected setting. Time to "
            "target: training wall time (evaluation excluded) at the first evaluation whose "
            "test metric reaches the target, over the seeds that reached it ('reached' column).",
            "- Step time: mean over the steps of a run (the first two left out). fwd+bwd: "
            "median time of one plain forward+backward at that batch size with no optimizer "
            "attached (jitted value_and_grad for JAX rows); opt overhead = step - fwd+bwd: "
            "extra passes, hooks, curvature, inverses and the update.",
            "- Peak memory: rise of the process's peak resident set size during the run "
            "(Linux clear_refs/VmHWM); allocator caching makes small values noisy.",
            "- Mean ‖g‖ (train): the global L2 norm of each step's minibatch gradient, measured "
            "at every step on that step's training batch at the parameters the step starts "
            "from (before the optimizer changes it: SAM's at w, IVON's at its sampled weights), "
            "averaged over all steps of the run (the paper's Figure 1; the `_grad_norm` plot "
            "shows it against steps and per epoch). Torch rows leave the time of this "
            "measurement out of their step time; JAX rows compute it inside the jitted step.",
            "- Final grad norm: norm of the gradient of the mean training loss over the whole "
            "training set (128 fixed windows for the char LM) at the final parameters.",
            "- RING runs in both forms, each its own row: adaptive_damping "
            "(d = (F + (λ + ρ‖g‖²) I)⁻¹ g) and gauss_newton (d = (1 − ρλ)(F + λI)⁻¹ g + ρ g), "
            "from the same base values; gauss_newton's sweep leaves out settings with "
            "ρλ > 1, which that form does not allow (adaptive_damping has no bound).",
            ""]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
