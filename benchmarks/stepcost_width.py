"""The step-cost width sweep: MLP d-d-10 (ReLU), batch 128, refresh every 10 steps, for each
d of ``--widths`` (default 256, 512, 1024, 2048): step time of RING (kfac), ASDL K-FAC and
AdamW, measured by the same machinery as the main rows (`stepcost_torch.measure_batch`); its
table, its targets at d = 2048 (RING/ASDL <= 0.4, RING/AdamW <= 4) and a log-log plot."""

from __future__ import annotations

from pathlib import Path

from benchmarks.formatting import markdown_table
from benchmarks.stepcost_format import (
    WIDTH_RING_VS_ADAMW,
    WIDTH_RING_VS_ASDL,
    WIDTH_TARGET_D,
    factored_cell,
    ms,
    ratio,
    verdict,
    work_note,
)
from benchmarks.stepcost_setup import WIDTH_BATCH, width_net
from benchmarks.stepcost_torch import measure_batch

WIDTH_KEYS = ("adamw", "asdl_kfac", "ring")


def width_results(widths, rows, tp, repeats: int, periods: int, bar, device="cpu") -> dict:
    """{d: measure_batch's result on MLP d-d-10 at batch 128} for the rows of WIDTH_KEYS."""
    rows = [r for r in rows if r[0] in WIDTH_KEYS]
    return {d: measure_batch(WIDTH_BATCH, rows, tp, repeats, periods, bar,
                             net=width_net(d, device), hvp=False) for d in widths}


def width_table(res: dict) -> str:
    """One line per width: step times, ratios, RING's own work and factored layers."""
    body = []
    for d, out in res["widths"].items():
        t = {k: out["rows"].get(k, {}).get("time") for k in WIDTH_KEYS}
        ring = out["rows"].get("ring", {})
        errs = "; ".join(f"{r['label']}: {r['error']}" for r in out["rows"].values()
                         if "error" in r)
        gfl = f"{ring['own_flops'] / 1e9:.3f}" if ring.get("own_flops") is not None else "–"
        body.append([str(d), ms(out["fb"]), ms(t["adamw"]), ms(t["asdl_kfac"]), ms(t["ring"]),
                     ratio(t["ring"], t["asdl_kfac"]), ratio(t["ring"], t["adamw"]), gfl,
                     factored_cell(ring), errs])
    return (f"### torch, width sweep: MLP d-d-10 (ReLU), batch {WIDTH_BATCH}\n\n"
            + markdown_table(["d", "fwd+bwd (ms)", "AdamW (ms)", "ASDL K-FAC (ms)",
                              "RING kfac (ms)", "RING / ASDL", "RING / AdamW",
                              "RING own GFLOP/step", "K-FAC layers factored", "note"], body))


def width_lines(res: dict) -> list[str]:
    """Target 2: RING/ASDL and RING/AdamW at d = 2048 (and the growth from the smallest d)."""
    widths = res.get("widths") or {}
    if not widths:
        return []
    if WIDTH_TARGET_D not in widths:
        return [f"- width sweep: d = {WIDTH_TARGET_D} not measured (--widths "
                f"{' '.join(map(str, widths))}): targets RING/ASDL <= {WIDTH_RING_VS_ASDL:g}x and "
                f"RING/AdamW <= {WIDTH_RING_VS_ADAMW:g}x not checked"]
    out = widths[WIDTH_TARGET_D]
    rows = out["rows"]
    t = {k: rows.get(k, {}).get("time") for k in WIDTH_KEYS}
    if not (t["ring"] and t["asdl_kfac"] and t["adamw"]):
        why = "; ".join(r.get("error", "") for r in rows.values() if "error" in r)
        return [f"- width d = {WIDTH_TARGET_D}: not measured ({why or 'a row is missing'})"]
    head = f"- width d = {WIDTH_TARGET_D} (MLP {WIDTH_TARGET_D}-{WIDTH_TARGET_D}-10, batch " \
           f"{WIDTH_BATCH}): RING kfac {t['ring'] * 1e3:.2f} ms"
    return [f"{head} vs ASDL K-FAC {t['asdl_kfac'] * 1e3:.2f} ms: "
            f"{verdict(t['ring'] / t['asdl_kfac'], WIDTH_RING_VS_ASDL)}"
            f"{work_note(rows['ring'], out['fb'])}",
            f"{head} vs AdamW {t['adamw'] * 1e3:.2f} ms: "
            f"{verdict(t['ring'] / t['adamw'], WIDTH_RING_VS_ADAMW)}"] + _growth(widths)


def _growth(widths: dict) -> list[str]:
    """Slope of log(step time) against log(d) between the smallest and the largest width."""
    import math

    ds = sorted(widths)
    if len(ds) < 2:
        return []
    lo, hi = widths[ds[0]]["rows"], widths[ds[-1]]["rows"]
    parts = []
    for key, name in (("ring", "RING"), ("asdl_kfac", "ASDL"), ("adamw", "AdamW")):
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
