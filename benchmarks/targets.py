"""Issue #15's verdicts per task, from the report's summary rows (:func:`report.summary_rows`):

- the winner: the optimizer that reaches the task's target first (mean training wall time, every
  seed reaching it), and the one with the best final test metric;
- the GRNG optimizers at their recommended setting (rows ``*_rec``): diverged or aborted runs,
  and whether one of them reaches the target in less wall time than AdamW and than ASDL's
  K-FAC and ends with a validation metric (mean of the last epoch's evaluations) at least as
  good as AdamW's; where not, by how much, split into steps to the target and time per step.
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.formatting import finite, fmt_num
from benchmarks.grng_runs import REC_SUFFIX
from benchmarks.hyperparams import GN_SUFFIX


def mean(v) -> float:
    v = finite(v)
    return float(np.mean(v)) if v else math.nan


def time_to_target(row: dict) -> float:
    """Mean wall time to the target; a row some seed of which missed it is infinitely slow."""
    return mean(row["ttt"]) if row["n"] and row["reached"] == row["n"] else math.inf


def _t(t: float) -> str:
    return "never (some seed missed it)" if not math.isfinite(t) else f"{t:.2f} s"


def _ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def winner_lines(rows: list[dict], task) -> list[str]:
    """Which optimizer reached the target first, and which ended with the best test metric."""
    trows = [r for r in rows if r["task"] == task.name]
    if not trows:
        return []
    fastest = min(trows, key=time_to_target)
    best = min(trows, key=lambda r: (-1 if task.higher_is_better else 1) * mean(r["test"])
               if math.isfinite(mean(r["test"])) else math.inf)
    t = time_to_target(fastest)
    out = [f"- Winner (wall time to the target): **{fastest['label']}**, {_t(t)}"
           + (f", {mean(fastest['stt']):.0f} steps" if math.isfinite(t) else "")
           if math.isfinite(t) else "- Winner: no optimizer reached the target on every seed."]
    out.append(f"- Best final test metric: {best['label']}, {fmt_num(mean(best['test']), 4)}")
    return out


def recommended_lines(rows: list[dict], task) -> list[str]:
    """Issue #15's targets for one task, judged on the GRNG rows at their defaults: met when
    none of their runs failed and one of them reaches the target sooner than AdamW and ASDL's
    K-FAC with a last-epoch validation metric at least as good as AdamW's (the line names
    that row, else the fastest)."""
    by = {r["opt"]: r for r in rows if r["task"] == task.name}
    rec = [r for k, r in by.items() if k.removesuffix(GN_SUFFIX).endswith(REC_SUFFIX)]
    if not rec:
        return []
    failed = sum(r["n"] - r["ok"] for r in rec)
    runs = sum(r["n"] for r in rec)
    out = [f"- GRNG at its defaults: {failed} of {runs} runs diverged or aborted"
           + (" (" + ", ".join(f"{r['label']}: {', '.join(r['status'])}" for r in rec
                               if r["ok"] < r["n"]) + ")" if failed else "")]
    adam, asdl = by.get("adamw"), by.get("asdl_kfac")
    if adam is None or asdl is None:
        return out + [f"- Issue #15 target ({task.name}): cannot be judged, AdamW or K-FAC "
                      "(ASDL) did not run."]
    a_t, k_t, a_v = time_to_target(adam), time_to_target(asdl), mean(adam["valid"])

    def verdict(r):
        t, v = time_to_target(r), mean(r["valid"])
        as_good = math.isfinite(v) and (not math.isfinite(a_v) or not task.better(a_v, v))
        return t < a_t and t < k_t, as_good

    ranked = sorted(rec, key=lambda r: (time_to_target(r), -_signed(task, mean(r["valid"]))))
    best = next((r for r in ranked if all(verdict(r))), ranked[0])
    faster, as_good = verdict(best)
    met = faster and as_good and failed == 0
    t, v = time_to_target(best), mean(best["valid"])
    out.append(
        f"- **Issue #15 target ({task.name}): {'MET' if met else 'NOT MET'}** — best GRNG at "
        f"its defaults, {best['label']}: time to target {_t(t)} vs AdamW {_t(a_t)} "
        f"({_ratio(t, a_t)}) and K-FAC (ASDL) {_t(k_t)} ({_ratio(t, k_t)}); validation "
        f"(last epoch's mean) {fmt_num(v, 4)} vs AdamW {fmt_num(a_v, 4)} "
        f"({'at least as good' if as_good else 'worse'}).")
    if not faster and math.isfinite(t):
        parts = [_split("it", best)] + [_split(name, r) for name, r in
                                        (("AdamW", adam), ("ASDL", asdl))]
        out.append("  Time to target = steps x time per step: " + "; ".join(parts) + ".")
    return out


def _signed(task, v: float) -> float:
    if not math.isfinite(v):
        return -math.inf
    return v if task.higher_is_better else -v


def _split(name: str, row: dict) -> str:
    """'<name>: <steps> steps x <ms> ms' (or that it did not reach the target)."""
    if not math.isfinite(time_to_target(row)):
        return f"{name}: did not reach it on every seed ({fmt_num(mean(row['step_ms']), 1)} ms " \
               "a step)"
    return (f"{name}: {fmt_num(mean(row['stt']), 0)} steps x "
            f"{fmt_num(mean(row['step_ms']), 1)} ms (fwd+bwd {fmt_num(mean(row['fb_ms']), 1)})")
