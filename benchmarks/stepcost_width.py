"""The step-cost width sweep: MLP d-d-10 (ReLU), batch 128, refresh every 10 steps, for each
d of ``--widths`` (default 256, 512, 1024, 2048): step time of RING (kfac; its default form
and, where the default is another, the gauss_newton form), ASDL K-FAC and AdamW, measured by
the same machinery as the main rows (`stepcost_torch.measure_batch`); its table, its targets
at d = 2048 (RING/ASDL <= 0.4, RING/AdamW <= 4) and a log-log plot."""

from __future__ import annotations

from pathlib import Path

from benchmarks.formatting import markdown_table
from benchmarks.stepcost_format import (
    RING_ROWS,
    WIDTH_RING_VS_ADAMW,
    WIDTH_RING_VS_ASDL,
    WIDTH_TARGET_D,
    factored_cell,
    floor_note,
    ms,
    ratio,
    verdict,
    work_note,
)
from benchmarks.stepcost_setup import WIDTH_BATCH, width_net
from benchmarks.stepcost_torch import measure_batch

WIDTH_KEYS = ("adamw", "asdl_kfac") + tuple(k for k, _ in RING_ROWS)


def width_results(widths, rows, tp, repeats: int, periods: int, bar, device="cpu") -> dict:
    """{d: measure_batch's result on MLP d-d-10 at batch 128} for the rows of WIDTH_KEYS."""
    rows = [r for r in rows if r[0] in WIDTH_KEYS]
    return {d: measure_batch(WIDTH_BATCH, rows, tp, repeats, periods, bar,
                             net=width_net(d, device), hvp=False) for d in widths}


def width_table(res: dict) -> str:
    """One line per width: step times, ratios, RING's own work and factored layers (each RING
    form measured)."""
    widths = res["widths"]
    forms = [(k, n) for k, n in RING_ROWS
             if any(k in out["rows"] for out in widths.values())]
    body = []
    for d, out in widths.items():
        t = {k: out["rows"].get(k, {}).get("time") for k in WIDTH_KEYS}
        errs = "; ".join(f"{r['label']}: {r['error']}" for r in out["rows"].values()
                         if "error" in r)
        line = [str(d), ms(out["fb"]), ms(t["adamw"]), ms(t["asdl_kfac"])]
        for k, _ in forms:
            r = out["rows"].get(k, {})
            gfl = f"{r['own_flops'] / 1e9:.3f}" if r.get("own_flops") is not None else "–"
            line += [ms(t[k]), ratio(t[k], t["asdl_kfac"]), ratio(t[k], t["adamw"]), gfl,
                     factored_cell(r)]
        body.append(line + [errs])
    head = ["d", "fwd+bwd (ms)", "AdamW (ms)", "ASDL K-FAC (ms)"]
    for _, n in forms:
        head += [f"{n} (ms)", f"{n} / ASDL", f"{n} / AdamW", f"{n} own GFLOP/step",
                 f"{n}: K-FAC layers factored"]
    return (f"### torch, width sweep: MLP d-d-10 (ReLU), batch {WIDTH_BATCH}\n\n"
            + markdown_table(head + ["note"], body))


def width_lines(res: dict) -> list[str]:
    """Target 2: RING/ASDL and RING/AdamW at d = 2048 for each RING form measured (and the
    growth from the smallest d)."""
    widths = res.get("widths") or {}
    if not widths:
        return []
    if WIDTH_TARGET_D not in widths:
        return [f"- width sweep: d = {WIDTH_TARGET_D} not measured (--widths "
                f"{' '.join(map(str, widths))}): targets RING/ASDL <= {WIDTH_RING_VS_ASDL:g}x and "
                f"RING/AdamW <= {WIDTH_RING_VS_ADAMW:g}x not checked"]
    out = widths[WIDTH_TARGET_D]
    rows = out["rows"]
    lines = []
    for key, name in RING_ROWS:
        if key not in rows:
            continue
        t = {k: rows.get(k, {}).get("time") for k in ("adamw", "asdl_kfac", key)}
        if not all(t.values()):
            why = "; ".join(r.get("error", "") for r in rows.values() if "error" in r)
            lines.append(f"- width d = {WIDTH_TARGET_D}, {name}: not measured "
                         f"({why or 'a row is missing'})")
            continue
        head = f"- width d = {WIDTH_TARGET_D} (MLP {WIDTH_TARGET_D}-{WIDTH_TARGET_D}-10, " \
               f"batch {WIDTH_BATCH}): {name} {t[key] * 1e3:.2f} ms"
        lines += [f"{head} vs ASDL K-FAC {t['asdl_kfac'] * 1e3:.2f} ms: "
                  f"{verdict(t[key] / t['asdl_kfac'], WIDTH_RING_VS_ASDL)}"
                  f"{floor_note(rows[key], WIDTH_RING_VS_ASDL * t['asdl_kfac'])}"
                  f"{work_note(rows[key], out['fb'])}",
                  f"{head} vs AdamW {t['adamw'] * 1e3:.2f} ms: "
                  f"{verdict(t[key] / t['adamw'], WIDTH_RING_VS_ADAMW)}"
                  f"{floor_note(rows[key], WIDTH_RING_VS_ADAMW * t['adamw'])}"]
    return lines + _growth(widths)


def _growth(widths: dict) -> list[str]:
    """Slope of log(step time) against log(d) between the smallest and the largest width."""
    import math

    ds = sorted(widths)
    if len(ds) < 2:
        return []
    lo, hi = widths[ds[0]]["rows"], widths[ds[-1]]["rows"]
    parts = []
    for key, name in (("ring", "RING"), ("ring_gn", "RING gauss_newton"), ("asdl_kfac", "ASDL"),
                      ("adamw", "AdamW")):
        a, b = lo.get(key, {}).get("time"), hi.get(key, {}).get("time")
        if a and b:
            parts.append(f"{name} {math.log(b / a) / math.log(ds[-1] / ds[0]):.2f}")
    return [f"- width sweep d = {ds[0]}..{ds[-1]}: step time grows as d^k, k = "
            + ", ".join(parts)] if parts else []


def width_plot(res: dict, path: Path) -> Path | None:
    """Step time against d, log-log, one line per optimizer (and forward+backward)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = res["widths"]
    ds = sorted(widths)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    series = [("fb", "forward+backward")] + [(k, None) for k in WIDTH_KEYS]
    for key, label in series:
        pts = [(d, widths[d]["fb"] if key == "fb" else
                widths[d]["rows"].get(key, {}).get("time")) for d in ds]
        pts = [(d, t * 1e3) for d, t in pts if t]
        if not pts:
            continue
        label = label or next(r["label"] for r in (widths[d]["rows"].get(key) for d in ds)
                              if r)
        ax.plot(*zip(*pts), marker="o", linestyle="--" if key == "fb" else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("width d (MLP d-d-10)")
    ax.set_ylabel("time per step (ms)")
    ax.set_title(f"Step cost against width, batch {WIDTH_BATCH}, refresh every "
                 f"{res['refresh_every']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
