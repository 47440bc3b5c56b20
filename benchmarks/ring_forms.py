"""Which RING form reaches a task's target first: each adaptive_damping row against its
gauss_newton twin (the same key + ``GN_SUFFIX``), from the report's summary rows.

A form that reaches the target on more seeds is first; between forms that reach it on as many
seeds, the smaller mean training wall time to the target is first. Steps and wall time are the
means over the seeds that reached the target; the line gives both differences.
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.formatting import finite
from benchmarks.hyperparams import GN_SUFFIX


def _mean(values) -> float:
    v = finite(values)
    return float(np.mean(v)) if v else math.nan


def _stats(row: dict) -> dict:
    n = row["n"]
    return {"form": row["hp"].get("form", "?"), "label": row["label"], "n": n,
            "reached": row["reached"], "t": _mean(row["ttt"]), "s": _mean(row["stt"]),
            "rank": (-(row["reached"] / n) if n else 0.0,
                     _mean(row["ttt"]) if row["reached"] else math.inf)}


def ring_form_pairs(rows: list[dict], task: str) -> list[list[dict]]:
    """The task's RING rows (those with a ``form``) grouped by family: [adaptive_damping
    row, gauss_newton row] where both ran, one row where only one did."""
    fams: dict = {}
    for r in rows:
        if r["task"] == task and "form" in r["hp"]:
            fams.setdefault(r["opt"].removesuffix(GN_SUFFIX), []).append(r)
    return [sorted(v, key=lambda r: r["opt"].endswith(GN_SUFFIX)) for v in fams.values()]


def _family(label: str) -> str:
    for form in ("adaptive_damping", "gauss_newton"):
        label = label.replace(f", {form}", "").replace(f" ({form})", "")
    return label


def compare_forms(pair: list[dict], target: str) -> str:
    """One markdown line: which form of the family reached ``target`` first, and by how much
    (seconds, steps), or that neither (or only one) did."""
    st = [_stats(r) for r in pair]
    fam = _family(pair[0]["label"])
    if len(st) == 1:
        return f"- {fam}: only form {st[0]['form']} ran; nothing to compare."
    if not any(s["reached"] for s in st):
        return (f"- {fam}: **neither form reached the target** ({target}): "
                + ", ".join(f"{s['form']} {s['reached']}/{s['n']} seeds" for s in st) + ".")
    w, lo = sorted(st, key=lambda s: s["rank"])
    head = (f"- {fam}: **{w['form']} reached the target first** ({target}): "
            f"{w['t']:.2f} s / {w['s']:.0f} steps ({w['reached']}/{w['n']} seeds)")
    if not lo["reached"]:
        return head + f"; {lo['form']} never did (0/{lo['n']} seeds)."
    dt, ds = lo["t"] - w["t"], lo["s"] - w["s"]
    secs = (f"{dt:.2f} s sooner ({w['t'] / lo['t']:.2f}x the time)" if dt >= 0 else
            f"on more seeds, though {-dt:.2f} s slower over the seeds that did")
    steps = (f"{ds:.0f} steps sooner" if ds > 0 else "in as many steps" if ds == 0 else
             f"{-ds:.0f} steps later" + (f" ({lo['form']} took fewer, costlier steps)"
                                         if dt >= 0 else ""))
    return (head + f" vs {lo['form']} {lo['t']:.2f} s / {lo['s']:.0f} steps "
            f"({lo['reached']}/{lo['n']} seeds): {secs}, {steps}.")


def ring_form_lines(rows: list[dict], task) -> list[str]:
    """The lines of every RING family of ``task`` (none when no RING row ran)."""
    op = ">=" if task.higher_is_better else "<="
    metric = "test accuracy" if task.metric == "accuracy" else "test bits/char"
    target = f"{metric} {op} {task.target:g}"
    return [compare_forms(p, target) for p in ring_form_pairs(rows, task.name)]
