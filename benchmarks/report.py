"""The suite's report: markdown tables (mean ± std over seeds), plots and a JSON dump."""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from benchmarks.formatting import finite, fmt_num, fmt_pm, markdown_table
from benchmarks.hyperparams import SWEEPS
from benchmarks.run_result import RunResult
from benchmarks.suite import final_runs


def group(runs: list[RunResult]) -> OrderedDict:
    """(task, opt) -> runs, in first-seen order."""
    out: OrderedDict = OrderedDict()
    for r in runs:
        out.setdefault((r.task, r.opt), []).append(r)
    return out


def summary_rows(runs: list[RunResult], metric_name: str = "test") -> list[dict]:
    """One dict per (task, optimizer) with the aggregated measurements."""
    rows = []
    for (task, opt), rs in group(runs).items():
        ok = [r for r in rs if r.status == "ok"]
        reached = [r for r in ok if math.isfinite(r.time_to_target)]
        rows.append({
            "task": task, "opt": opt, "label": rs[0].label, "n": len(rs), "ok": len(ok),
            "hp": rs[0].hp,
            "test": [r.final_test for r in ok],
            "loss": [r.final_loss for r in ok],
            "ttt": [r.time_to_target for r in reached], "reached": len(reached),
            "stt": [r.steps_to_target for r in reached],
            "step_ms": [r.step_time * 1e3 for r in rs if math.isfinite(r.step_time)],
            "fb_ms": [r.fb_time * 1e3 for r in rs if math.isfinite(r.fb_time)],
            "opt_ms": [r.opt_time * 1e3 for r in rs if math.isfinite(r.opt_time)],
            "mem": [r.peak_mem_mb for r in rs],
            "gnorm": [r.grad_norm for r in ok],
            "status": sorted({r.status for r in rs}),
        })
    return rows


def format_hp(hp: dict, keys=("lr", "damping", "rho")) -> str:
    return ", ".join(f"{k}={hp[k]:g}" for k in keys if k in hp)


def results_table(rows: list[dict], metric: str) -> str:
    mname = "test acc" if metric == "accuracy" else "test bpc"
    headers = ["optimizer", "selected", mname, "time to target (s)", "steps to target",
               "reached",
               "step (ms)", "fwd+bwd (ms)", "opt overhead (ms)", "peak mem (MiB)",
               "final grad norm", "final train loss"]
    body = []
    for r in rows:
        status = "" if r["ok"] == r["n"] else f" ({r['n'] - r['ok']} failed/diverged)"
        body.append([
            r["label"] + status, format_hp(r["hp"]), fmt_pm(r["test"], 4),
            fmt_pm(r["ttt"], 2), fmt_pm(r["stt"], 0), f"{r['reached']}/{r['n']}",
            fmt_pm(r["step_ms"], 2), fmt_pm(r["fb_ms"], 2), fmt_pm(r["opt_ms"], 2),
            fmt_pm(r["mem"], 2), fmt_pm(r["gnorm"], 4), fmt_pm(r["loss"], 4),
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
    for key in ("reng", "ring", "rkalman", "ngd"):
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
# plots


def plot_task(results: list[RunResult], task, path: Path) -> Path | None:
    """Training loss and test metric vs steps and vs wall time, mean over seeds."""
    try:
        import matplotlib
    except ImportError:  # the test extra has no matplotlib: the report says so
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.task == task.name and r.history and r.status != "error"]
    if not runs:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    mlabel = "test accuracy" if task.metric == "accuracy" else "test bits/char"
    for (_, opt), rs in group(runs).items():
        n = min(len(r.history) for r in rs)
        if n < 2:
            continue
        steps = np.array([h["step"] for h in rs[0].history[:n]])
        tm = np.mean([[h["time"] for h in r.history[:n]] for r in rs], axis=0)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the step-0 point has no loss
            loss = np.nanmean([[h["loss"] for h in r.history[:n]] for r in rs], axis=0)
        test = np.nanmean([[h["test"] for h in r.history[:n]] for r in rs], axis=0)
        style = "-" if opt.split("_")[0] in ("reng", "ring", "rkalman", "ngd", "grng") else "--"
        kw = dict(label=rs[0].label, linestyle=style, linewidth=1.4)
        axes[0, 0].plot(steps[1:], loss[1:], **kw)
        axes[0, 1].plot(tm[1:], loss[1:], **kw)
        axes[1, 0].plot(steps, test, **kw)
        axes[1, 1].plot(tm, test, **kw)
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
    for ax in axes[1]:
        ax.set_ylabel(mlabel)
        ax.axhline(task.target, color="grey", linewidth=0.8, linestyle=":")
        if task.metric == "accuracy":
            ax.set_ylim(max(0.0, task.target - 0.25), 1.0)
    for ax in axes[:, 0]:
        ax.set_xlabel("steps")
    for ax in axes[:, 1]:
        ax.set_xlabel("training wall time (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"{task.title}: mean over seeds (selected settings)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    return report, "\n\n".join(tables)


def task_section(task, rows: list[dict], results: list[RunResult], fin: list[RunResult],
                 info: dict, outdir: Path, plots: bool) -> tuple[list[str], str]:
    """(markdown lines of one task's section, its results table): data, target, the table,
    the digits target, the plot and the sweep."""
    trows = [r for r in rows if r["task"] == task.name]
    md = [f"## {task.title}", ""]
    narrowed = "".join(f" Sweep narrowed here: {k} x {', '.join(f'{m:.3g}' for m in v)}."
                       for k, v in task.sweep.items())
    md.append(f"Data: {task.meta.get('data', '')}. Batch {task.batch_size}, "
              f"{task.epochs} epochs of {task.n_steps_per_epoch()} steps, "
              f"{info['seeds']} seeds. Target: test "
              f"{'accuracy >=' if task.higher_is_better else 'bits/char <='} "
              f"{task.target:g}.{narrowed}")
    md.append("")
    table = results_table(trows, task.metric)
    md += [table, ""]
    if task.name == "digits_mlp":
        md += digits_targets(rows) + [""]
    if plots:
        p = plot_task(fin, task, outdir / f"{task.name}.png")
        if p is not None:
            md += [f"![{task.name}]({p.name})", ""]
        else:
            md += ["(no plot: matplotlib is not installed)", ""]
    md += ["<details><summary>Sweep (seed 0)</summary>", "",
           sweep_table(results, task.name, task.metric), "", "</details>", ""]
    return md, table


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
            "- Final grad norm: norm of the gradient of the mean training loss over the whole "
            "training set (128 fixed windows for the char LM) at the final parameters.",
            ""]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
