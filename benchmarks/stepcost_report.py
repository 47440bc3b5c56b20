"""The step-cost report: markdown tables (time per step relative to AdamW and to one
forward+backward, FLOPs and matmul efficiency of the optimizer's own work, the K-FAC layers in
factored form), issue #11's step-cost targets met or not (with the measured ratios), and
stepcost.md / stepcost.json. Benchmarks measure; they never fail on a target."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.formatting import markdown_table
from benchmarks.hyperparams import REFRESH_EVERY
from benchmarks.stepcost_format import (
    DIGITS_RING_VS_ASDL,
    EFFICIENCY,
    JAX_SPREAD,
    JAX_VS_HAND,
    RING_ROWS,
    RING_VS_ASDL,
    RKALMAN_VS_RING,
    factored_cell,
    floor_note,
    ms,
    ratio,
    verdict,
    work_note,
)
from benchmarks.stepcost_width import width_lines, width_plot, width_table


def tables(res: dict) -> str:
    """Markdown tables of every batch size (torch rows, then the JAX rows), the digits pair
    and the width sweep."""
    parts = []
    for b, out in res["batches"].items():
        parts.append(torch_table(f"torch, {res.get('title', 'MLP')}, batch {b}", out))
        jx = out.get("jax", {})
        if jx:
            parts.append(jax_table(b, jx))
    if res.get("digits"):
        d = res["digits"]
        parts.append(torch_table(f"torch, default suite's digits {d['net']}, batch {d['batch']}",
                                 d))
    if res.get("widths"):
        parts.append(width_table(res))
    return "\n\n".join(parts)


def torch_table(title: str, out: dict) -> str:
    rows = out["rows"]
    adam = rows.get("adamw", {}).get("time")
    fb = out["fb"]
    body = []
    for r in rows.values():
        if "error" in r:
            body.append([r["label"], "–", "–", "–", "–", "–", "–", "–", r["error"]])
            continue
        t = r["time"]
        own = t - fb
        flops = r.get("own_flops")
        gfl = "–" if flops is None else f"{flops / 1e9:.3f}"
        rate = "–" if flops is None or own <= 0 else f"{flops / own / 1e9:.1f}"
        eff = "–" if flops is None or own <= 0 else f"{r['ideal_time'] / own:.0%}"
        body.append([r["label"], ms(t), ratio(t, adam), ratio(t, fb), gfl, rate, eff,
                     factored_cell(r), ""])
    extra = f"; double-backprop HVP adds {ms(out['hvp_extra'])} ms" if "hvp_extra" in out else ""
    return (f"### {title}\n\nforward+backward {ms(fb)} ms{extra}.\n\n" + markdown_table(
        ["optimizer", "step (ms)", "x AdamW", "x fwd+bwd", "own GFLOP/step", "own GFLOP/s",
         "of matmul peak", "K-FAC layers factored", "note"], body))


def jax_table(b, jx: dict) -> str:
    jfb = jx.get("jax_fb", {}).get("time")
    jadam = jx.get("jax_adamw", {}).get("time")
    jb = []
    for key, r in jx.items():
        if key == "jax_fb":
            continue
        if "error" in r:
            jb.append([r["label"], "–", "–", "–", "–", r["error"]])
            continue
        spread = (f"{r['spread']:.2f} ({ms(r.get('max_plain'))} / {ms(r.get('median'))})"
                  if "spread" in r else "–")
        jb.append([r["label"], ms(r["time"]), ratio(r["time"], jadam), ratio(r["time"], jfb),
                   spread, ""])
    return (f"### JAX (jit), batch {b}\n\nforward+backward {ms(jfb)} ms. Spread: the costliest "
            "step position that refreshes nothing / the median position, each position's cost "
            "its least disturbed call over the windows of two refresh periods timed step by "
            "step (ms / ms).\n\n"
            + markdown_table(["optimizer", "step (ms)", "x AdamW", "x fwd+bwd", "spread",
                              "note"], jb))


def _time(out: dict, key: str):
    return out.get("rows", {}).get(key, {}).get("time")


def _row(out: dict, key: str) -> dict:
    return out.get("rows", {}).get(key, {})


def ring_lines(b, out: dict) -> list[str]:
    """Targets 1 and 3 at one batch size (RING vs ASDL, RENG and R-Kalman vs RING)."""
    lines, fb = [], out["fb"]
    ring, asdl = _time(out, "ring"), _time(out, "asdl_kfac")
    for key, name in RING_ROWS:
        t = _time(out, key)
        if not (t and asdl):
            continue
        limit = RING_VS_ASDL.get(b)
        v = verdict(t / asdl, limit) + floor_note(_row(out, key), limit * asdl) if limit else \
            f"{t / asdl:.2f}x (issue #11 sets targets at batch 128 and 1024 only)"
        asdl_note = f"; ASDL{work_note(_row(out, 'asdl_kfac'), fb)}" if key == "ring" else ""
        lines.append(f"- batch {b}: {name} {t * 1e3:.2f} ms vs ASDL K-FAC {asdl * 1e3:.2f}"
                     f" ms (both refreshed every {REFRESH_EVERY} steps): {v}"
                     f"{work_note(_row(out, key), fb)}{asdl_note}")
    reng = _time(out, "reng")
    if reng and ring and "hvp_extra" in out:
        bound = ring + out["hvp_extra"]
        lines.append(f"- batch {b}: RENG (double backprop) {reng * 1e3:.2f} ms vs RING + HVP "
                     f"extra {bound * 1e3:.2f} ms: {verdict(reng / bound, 1)}"
                     f"{work_note(_row(out, 'reng'), fb)}")
    fd = _time(out, "reng_fd")
    if fd and ring:
        bound = ring + fb
        lines.append(f"- batch {b}: RENG (finite diff.) {fd * 1e3:.2f} ms vs RING + one "
                     f"forward+backward {bound * 1e3:.2f} ms: {verdict(fd / bound, 1)}"
                     f"{work_note(_row(out, 'reng_fd'), fb)}")
    rk = _time(out, "rkalman")
    if rk and ring:
        lines.append(f"- batch {b}: R-Kalman kfac {rk * 1e3:.2f} ms vs RING kfac "
                     f"{ring * 1e3:.2f} ms: {verdict(rk / ring, RKALMAN_VS_RING)}"
                     f"{work_note(_row(out, 'rkalman'), fb)}")
    return lines + _woodbury_lines(b, out, ring)


def _woodbury_lines(b, out: dict, ring) -> list[str]:
    lines = []
    for key in ("ring_woodbury", "rkalman_woodbury"):
        r = out["rows"].get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"- batch {b}: {r['label']}: {r['error']}")
        else:
            lines.append(f"- batch {b}: {r['label']} cost {r['time'] * 1e3:.1f} ms per "
                         f"step ({ratio(r['time'], out['fb'])}x forward+backward, "
                         f"{ratio(r['time'], ring)}x RING kfac)")
    return lines


def jax_lines(b, jx: dict) -> list[str]:
    """Target 5 at one batch size: grng_jax RING vs the hand-written RING (in-graph refresh, as
    an optax transformation must; the host-dispatched one for context), and the spread."""
    g, h, host = jx.get("jax_ring", {}), jx.get("jax_ring_ref", {}), jx.get("jax_ring_host", {})
    if "time" not in g or "time" not in h:
        why = g.get("error") or h.get("error") or "not measured"
        return [f"- batch {b}: JAX RING vs hand-written: {why}"]
    ctx = (f"; vs the hand-written one with the refresh picked on the host "
           f"{host['time'] * 1e3:.2f} ms: {g['time'] / host['time']:.2f}x") if "time" in host \
        else ""
    lines = [f"- batch {b}: grng_jax RING kfac (jit) {g['time'] * 1e3:.2f} ms vs the same math "
             f"by hand in jax.numpy (jit, lax.cond refresh) {h['time'] * 1e3:.2f} ms: "
             f"{verdict(g['time'] / h['time'], JAX_VS_HAND)}{ctx}"]
    if "spread" in g:
        raw = (f"; slowest single call that refreshed nothing {g['max_plain_raw'] * 1e3:.2f} ms"
               if "max_plain_raw" in g else "")
        lines.append(f"- batch {b}: grng_jax RING costliest step that refreshes nothing "
                     f"{g['max_plain'] * 1e3:.2f} ms vs median step {g['median'] * 1e3:.2f} "
                     f"ms: {verdict(g['spread'], JAX_SPREAD)} (hand-written: "
                     f"{h.get('spread', math.nan):.2f}x; each step position's least disturbed "
                     f"call{raw})")
    return lines


def digits_lines(res: dict) -> list[str]:
    """Target 4: the default suite's digits MLP, RING's step (each form measured) vs ASDL's."""
    d = res.get("digits")
    if not d:
        return []
    lines = []
    for key, name in RING_ROWS:
        if key not in d["rows"]:
            continue
        ring, asdl = _time(d, key), _time(d, "asdl_kfac")
        if not (ring and asdl):
            why = _row(d, key).get("error") or _row(d, "asdl_kfac").get("error") \
                or "not measured"
            lines.append(f"- digits {d['net']}: {name} vs ASDL: {why}")
            continue
        lines.append(f"- digits {d['net']}, batch {d['batch']}: {name} {ring * 1e3:.3f} ms vs "
                     f"ASDL K-FAC {asdl * 1e3:.3f} ms: {verdict(ring / asdl, DIGITS_RING_VS_ASDL)}"
                     f"{work_note(_row(d, key), d['fb'])}")
    return lines


def targets(res: dict) -> list[str]:
    """Issue #11's step-cost targets, met or not and by how much."""
    lines = []
    for b, out in res["batches"].items():
        lines += ring_lines(b, out)
        if out.get("jax"):
            lines += jax_lines(b, out["jax"])
    lines += width_lines(res) + digits_lines(res)
    return lines + efficiency_lines(res)


def efficiency_lines(res: dict) -> list[str]:
    """Batch 1024: the GRNG rows' own work against the measured matmul throughput."""
    lines = []
    big = res["batches"].get(1024)
    if big:
        for key in ("ring", "ring_chol", "ngd", "reng", "rkalman"):
            r = big["rows"].get(key, {})
            if "ideal_time" not in r or "time" not in r:
                continue
            own = r["time"] - big["fb"]
            eff = r["ideal_time"] / own if own > 0 else math.inf
            lines.append(f"- batch 1024: {r['label']} own work {r['own_flops'] / 1e9:.2f} GFLOP "
                         f"per step in {own * 1e3:.1f} ms = {eff:.0%} of the measured matmul "
                         f"throughput at its shapes -> {'MET' if eff >= EFFICIENCY else 'NOT MET'}"
                         f" (target >= {EFFICIENCY:.0%})")
    return lines


def header(res: dict) -> str:
    """What the run measured on: threads, device, throughput, refresh, RING form, load."""
    pools = ", ".join(f"{k} {v}" for k, v in res.get("thread_pools", {}).items())
    return (f"torch threads {res['threads']} (thread pools: {pools or 'defaults'}; XLA keeps "
            f"its own); JAX backend {res.get('jax_backend', '–')}; torch device "
            f"{res.get('device', 'cpu')}; float32 matmul 1024^3: "
            f"{res['peak_square_gflops']:.1f} GFLOP/s; curvature and inverses every "
            f"{res['refresh_every']} steps; RING form of the torch rows: "
            f"{res.get('ring_form', 'gauss_newton')} (the JAX pair: gauss_newton, the "
            "hand-written math); times are the best of the measured windows. Load average at "
            f"start {res.get('load_start')}, at end {res.get('load_end')} (above the core "
            "count, other work shared the machine and the times are inflated).")


def write(res: dict, outdir: Path, method: str = "") -> Path:
    """Write stepcost.md (targets, tables, the width plot, then ``method``: how it was
    measured) and stepcost.json; returns the markdown's path."""
    outdir.mkdir(parents=True, exist_ok=True)
    md = [f"# Step cost: {res.get('title', 'MLP 784-1024-256-10')}", "", header(res), "",
          "## Targets (issue #11)", ""] + targets(res) + ["", tables(res), ""]
    if res.get("widths"):
        png = width_plot(res, outdir / "stepcost_widths.png")
        md += [f"![step time against width]({png.name})" if png else
               "(no width plot: matplotlib is not installed)", ""]
    md.append(method)
    path = outdir / "stepcost.md"
    path.write_text("\n".join(md), encoding="utf-8")
    (outdir / "stepcost.json").write_text(json.dumps(res, indent=1, default=str),
                                          encoding="utf-8")
    return path
