"""Shared pieces of the step-cost report: issue #11's limits, numbers, verdicts, and the note
on a row's own work (FLOPs against the measured matmul throughput, K-FAC layers' form)."""

from __future__ import annotations

import math

from benchmarks.stepcost_setup import factored_note

#: RING kfac / ASDL K-FAC at equal refresh intervals, per batch size (issue #11)
RING_VS_ASDL = {128: 0.6, 1024: 1.0}
RKALMAN_VS_RING = 1.3
DIGITS_RING_VS_ASDL = 0.8
JAX_VS_HAND = 1.2
JAX_SPREAD = 1.5
EFFICIENCY = 0.5
#: the width sweep's targets at d = WIDTH_TARGET_D (MLP d-d-10, batch 128)
WIDTH_TARGET_D = 2048
WIDTH_RING_VS_ASDL = 0.4
WIDTH_RING_VS_ADAMW = 4.0


def ms(t):
    return "–" if t is None or not math.isfinite(t) else f"{t * 1e3:.2f}"


def ratio(a, b):
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "–"
    return f"{a / b:.2f}"


# (row key, name) of RING's default form and of its gauss_newton form, each judged on the targets
RING_ROWS = (("ring", "RING kfac"), ("ring_gn", "RING kfac gauss_newton"))


def verdict(r: float, limit: float, at_least: bool = False) -> str:
    """'0.83x -> MET (target <= 1x)' for the measured ratio ``r``."""
    ok = r >= limit if at_least else r <= limit
    sign = ">=" if at_least else "<="
    return f"{r:.2f}x -> {'MET' if ok else 'NOT MET'} (target {sign} {limit:g}x)"


def floor_note(r: dict, budget: float) -> str:
    """'; the target allows 26.8 ms a step, the eigendecompositions alone take 27.1 ms' where
    a RING row keeps eigenbases and its target is missed (else '')."""
    floor = r.get("eigh_floor")
    if floor is None or not r.get("time") or r["time"] <= budget:
        return ""
    rest = r["time"] - floor["seconds"]
    return (f"; the target allows {budget * 1e3:.2f} ms a step, of which the default form's "
            f"eigendecompositions alone take {floor['seconds'] * 1e3:.2f} ms "
            f"({floor['seconds'] / budget:.0%}); the step without them: {rest * 1e3:.2f} ms")


def work_note(r: dict, fb: float | None) -> str:
    """'own work 1.23 GFLOP/step in 4.5 ms = 40% of the measured matmul throughput at its
    shapes; K-FAC layers: ...' for a row with counted FLOPs (else '')."""
    parts = []
    if r.get("own_flops") is not None and r.get("time") is not None and fb is not None:
        own = r["time"] - fb
        eff = f"{r['ideal_time'] / own:.0%}" if own > 0 else "–"
        parts.append(f"own work {r['own_flops'] / 1e9:.3f} GFLOP/step in {own * 1e3:.2f} ms = "
                     f"{eff} of the measured matmul throughput at its shapes")
    floor = r.get("eigh_floor")
    if floor is not None and r.get("time"):
        sizes = ", ".join(map(str, floor["sizes"]))
        parts.append(f"of its step, the eigendecompositions of the default form's exact per-step "
                     f"damping (§3.2; factors {sizes}, {floor['per_refresh'] * 1e3:.1f} ms a "
                     f"refresh) take {floor['seconds'] * 1e3:.2f} ms "
                     f"({floor['seconds'] / r['time']:.0%})")
    note = factored_note(r.get("kfac_layers", []), r.get("factored_applies"))
    if note:
        parts.append(f"K-FAC layers: {note}")
    return f" [{'; '.join(parts)}]" if parts else ""


def factored_cell(r: dict) -> str:
    layers = r.get("kfac_layers")
    if not layers or r.get("factored_applies") is None:
        return "–"
    if not r["factored_applies"]:
        return f"0/{len(layers)}"
    return f"{sum(x['factored'] for x in layers)}/{len(layers)}"
