"""The step-cost report: markdown tables (time per step relative to AdamW and to one
forward+backward, FLOPs and matmul efficiency of the optimizer's own work), the issue's
step-cost targets met or not, and stepcost.md / stepcost.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.formatting import markdown_table
from benchmarks.hyperparams import REFRESH_EVERY


def _ms(t):
    return "–" if t is None or not math.isfinite(t) else f"{t * 1e3:.2f}"


def _x(a, b):
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "–"
    return f"{a / b:.2f}"


def tables(res: dict) -> str:
    """Markdown tables of every batch size: torch rows, then the JAX rows."""
    parts = []
    for b, out in res["batches"].items():
        parts.append(torch_table(b, out))
        jx = out.get("jax", {})
        if jx:
            parts.append(jax_table(b, jx))
    return "\n\n".join(parts)


def torch_table(b, out: dict) -> str:
    rows = out["rows"]
    adam = rows.get("adamw", {}).get("time")
    fb = out["fb"]
    body = []
    for r in rows.values():
        if "error" in r:
            body.append([r["label"], "–", "–", "–", "–", "–", "–", r["error"]])
            continue
        t = r["time"]
        own = t - fb
        flops = r.get("own_flops")
        gfl = "–" if flops is None else f"{flops / 1e9:.3f}"
        rate = "–" if flops is None or own <= 0 else f"{flops / own / 1e9:.1f}"
        eff = "–" if flops is None or own <= 0 else f"{r['ideal_time'] / own:.0%}"
        body.append([r["label"], _ms(t), _x(t, adam), _x(t, fb), gfl, rate, eff, ""])
    return (f"### torch, batch {b}\n\nforward+backward {_ms(fb)} ms; double-backprop "
            f"HVP adds {_ms(out['hvp_extra'])} ms.\n\n" + markdown_table(
                ["optimizer", "step (ms)", "x AdamW", "x fwd+bwd",
                 "own GFLOP/step", "own GFLOP/s", "of matmul peak", "note"], body))


def jax_table(b, jx: dict) -> str:
    jfb = jx.get("jax_fb", {}).get("time")
    jadam = jx.get("jax_adamw", {}).get("time")
    jb = []
    for key, r in jx.items():
        if key == "jax_fb":
            continue
        if "error" in r:
            jb.append([r["label"], "–", "–", "–", r["error"]])
        else:
            jb.append([r["label"], _ms(r["time"]), _x(r["time"], jadam),
                       _x(r["time"], jfb), ""])
    return (f"### JAX (jit), batch {b}\n\nforward+backward {_ms(jfb)} ms.\n\n"
            + markdown_table(["optimizer", "step (ms)", "x AdamW", "x fwd+bwd", "note"], jb))


def targets(res: dict) -> list[str]:
    """The issue's step-cost targets, met or not and by how much."""
    lines = []

    def t(b, key):
        r = res["batches"].get(b, {}).get("rows", {}).get(key, {})
        return r.get("time")

    for b, out in res["batches"].items():
        ring, asdl = t(b, "ring"), t(b, "asdl_kfac")
        if ring and asdl:
            ok = ring <= asdl
            lines.append(f"- batch {b}: RING kfac {ring * 1e3:.2f} ms vs ASDL K-FAC "
                         f"{asdl * 1e3:.2f} ms (both refreshed every {REFRESH_EVERY} steps): "
                         f"{ring / asdl:.2f}x -> {'MET' if ok else 'NOT MET'} (target <= 1x)")
        reng = t(b, "reng")
        if reng and ring:
            bound = ring + out["hvp_extra"]
            lines.append(f"- batch {b}: RENG (double backprop) {reng * 1e3:.2f} ms vs RING + "
                         f"HVP extra {bound * 1e3:.2f} ms: {reng / bound:.2f}x -> "
                         f"{'MET' if reng <= bound else 'NOT MET'} (target <= 1x)")
        fd = t(b, "reng_fd")
        if fd and ring:
            bound = ring + out["fb"]
            lines.append(f"- batch {b}: RENG (finite diff.) {fd * 1e3:.2f} ms vs RING + one "
                         f"forward+backward {bound * 1e3:.2f} ms: {fd / bound:.2f}x -> "
                         f"{'MET' if fd <= bound else 'NOT MET'} (target <= 1x)")
        rk = t(b, "rkalman")
        if rk and ring:
            lines.append(f"- batch {b}: R-Kalman kfac {rk * 1e3:.2f} ms vs RING kfac "
                         f"{ring * 1e3:.2f} ms: {rk / ring:.2f}x -> "
                         f"{'MET' if rk <= 1.3 * ring else 'NOT MET'} (target <= 1.3x)")
        for key in ("ring_woodbury", "rkalman_woodbury"):
            r = out["rows"].get(key)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"- batch {b}: {r['label']}: {r['error']}")
            else:
                lines.append(f"- batch {b}: {r['label']} cost {r['time'] * 1e3:.1f} ms per "
                             f"step ({_x(r['time'], out['fb'])}x forward+backward, "
                             f"{_x(r['time'], ring)}x RING kfac)")
    return lines + efficiency_lines(res)


def efficiency_lines(res: dict) -> list[str]:
    """Batch 1024: the GRNG rows' own work against the measured matmul throughput."""
    lines = []
    big = res["batches"].get(1024)
    if big:
        for key in ("ring", "ring_chol", "ngd", "reng", "rkalman"):
            r = big["rows"].get(key, {})
            if "ideal_time" not in r:
                continue
            own = r["time"] - big["fb"]
            eff = r["ideal_time"] / own if own > 0 else math.inf
            lines.append(f"- batch 1024: {r['label']} own work {r['own_flops'] / 1e9:.2f} GFLOP "
                         f"per step in {own * 1e3:.1f} ms = {eff:.0%} of the measured matmul "
                         f"throughput at its shapes -> {'MET' if eff >= 0.5 else 'NOT MET'} "
                         "(target >= 50%)")
    return lines


def write(res: dict, outdir: Path, method: str = "") -> Path:
    """Write stepcost.md (targets, tables, then ``method``: how it was measured) and
    stepcost.json; returns the markdown's path."""
    outdir.mkdir(parents=True, exist_ok=True)
    md = ["# Step cost: MLP 784-1024-256-10", "",
          f"torch threads {res['threads']}; float32 matmul 1024^3: "
          f"{res['peak_square_gflops']:.1f} GFLOP/s; curvature and inverses every "
          f"{res['refresh_every']} steps; times are the best of the measured windows. "
          f"Load average at start {res.get('load_start')}, at end {res.get('load_end')} "
          "(above the core count, other work shared the machine and the times are inflated).",
          "",
          "## Targets", ""] + targets(res) + ["", tables(res), "", method]
    path = outdir / "stepcost.md"
    path.write_text("\n".join(md), encoding="utf-8")
    (outdir / "stepcost.json").write_text(json.dumps(res, indent=1, default=str),
                                          encoding="utf-8")
    return path
