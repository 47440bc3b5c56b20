"""Step-cost microbenchmark: ``python -m benchmarks.stepcost`` (or ``python -m benchmarks
--stepcost``).

An MLP 784-1024-256-10 (ReLU) on a fixed random batch of 128 and of 1024 examples. For every
optimizer: the mean time of one training step, relative to AdamW's step and to one plain
forward+backward. Curvature and inverses of every K-FAC-type method are refreshed every
``REFRESH_EVERY`` (10) steps, so a timing window of whole refresh periods gives the amortised
cost. For the GRNG optimizers (and ASDL K-FAC, for comparison) the FLOPs of the optimizer's
own work per step are counted from the shapes of the products that ran
(:class:`benchmarks.flops.MatmulRecorder`, minus the recorded forward+backward) and set against
the machine's measured float32 matmul throughput at those same shapes: efficiency =
(time those products take at the measured throughput) / (step time - forward+backward time).

JAX rows (jitted): ``optax.adamw``, ``grng_jax`` RING kfac and ``kfac-jax`` where it runs,
relative to the jitted forward+backward and the jitted AdamW step.

Each time is the best of ``repeats`` windows (the machine is shared; the minimum is the least
disturbed window). The report goes to <out>/stepcost.md and stepcost.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.flops import MatmulRecorder, Throughput, subtract, total_flops
from benchmarks.optimizers import EMA_DECAY, REFRESH_EVERY

SIZES = (784, 1024, 256, 10)
LR, DAMPING = 0.01, 0.1  # every K-FAC-type row (the values do not change the cost)
WOODBURY_LIMIT_BYTES = 2.5e9  # skip woodbury where J (B x N float32) would exceed this


def _model(seed: int = 0):
    from benchmarks.models import mlp

    torch.manual_seed(seed)
    return mlp(SIZES, "relu")


def _batch(b: int):
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (b,), generator=g)


class _Shim:
    """What the optimizer builders read from a task."""

    seq_len = 0

    def __init__(self, b: int):
        self.batch_size = b
        self.n_train = 60_000
        self.structures = {}


def torch_rows(full: bool) -> list[tuple[str, str, callable]]:
    """(key, label, build(model, batch_size) -> stepper) of every torch row."""
    from benchmarks import optimizers as O
    from benchmarks.grng_runs import build_grng, common_hp

    specs = {s.key: s for s in O.all_specs()}

    def peer(key, **over):
        def build(model, b):
            s = specs[key]
            return s.build(model, _Shim(b), dict(s.base, **over), 0)
        return build

    def grng(algo, structure, **over):
        def build(model, b):
            hp = dict(common_hp(LR, DAMPING), rho=0.05, **over)
            if algo == "rkalman":
                hp.update(prior_var=1.0, kalman_decay=0.95)
            if algo == "ngd":
                hp.pop("rho")
            return build_grng(algo, structure, model, hp)
        return build

    rows = [
        ("sgd", "SGD (momentum)", peer("sgd")),
        ("adamw", "AdamW", peer("adamw")),
        ("asdl_kfac", "K-FAC (ASDL)", peer("asdl_kfac", lr=LR, damping=DAMPING)),
        ("ring", "RING (kfac)", grng("ring", "kfac")),
        ("ring_chol", "RING (kfac, Cholesky)", grng("ring", "kfac", inverse_method="cholesky")),
        ("ngd", "NGD (kfac)", grng("ngd", "kfac")),
        ("reng", "RENG (kfac, double backprop)", grng("reng", "kfac")),
        ("reng_fd", "RENG (kfac, finite diff.)", grng("reng", "kfac", gr="finite_difference")),
        ("rkalman", "R-Kalman (kfac)", grng("rkalman", "kfac")),
        ("ring_woodbury", "RING (woodbury)", grng("ring", "woodbury")),
        ("rkalman_woodbury", "R-Kalman (woodbury)", grng("rkalman", "woodbury")),
        ("sophiah", "SophiaH", peer("sophiah")),
        ("sam", "SAM (SGD)", peer("sam")),
        ("ivon", "IVON", peer("ivon")),
    ]
    if full:
        rows += [("psgd_kron", "PSGDKron (heavyball)", peer("psgd_kron")),
                 ("soap", "SOAP (heavyball)", peer("soap")),
                 ("muon", "Muon (heavyball)", peer("muon"))]
    return rows


GRNG_KEYS = ("ring", "ring_chol", "ngd", "reng", "reng_fd", "rkalman", "ring_woodbury",
             "rkalman_woodbury")


def _time_window(fn, steps: int, repeats: int) -> float:
    """Best-of-``repeats`` mean seconds per call over windows of ``steps`` calls."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def reference_fns(b: int) -> dict:
    """Plain forward+backward, and forward + gradient with graph + HVP backward (double
    backprop) next to a plain gradient, as callables; their FLOPs are recorded once."""
    lf = torch.nn.functional.cross_entropy
    x, y = _batch(b)
    m_fb = _model()

    def fb():
        m_fb.zero_grad(set_to_none=True)
        lf(m_fb(x), y).backward()

    m_h = _model()
    params = list(m_h.parameters())
    v = [torch.randn_like(p) for p in params]

    def with_hvp():
        g = torch.autograd.grad(lf(m_h(x), y), params, create_graph=True)
        torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

    def plain_grad():
        torch.autograd.grad(lf(m_h(x), y), params)

    return {"_fb": fb, "_hvp": with_hvp, "_grad": plain_grad}


# ---------------------------------------------------------------------------------------------
# JAX


def jax_rows(b: int, steps: int, repeats: int) -> dict:
    """{key: (label, seconds per step or error string)} of the jitted JAX rows."""
    import jax
    import jax.numpy as jnp

    from benchmarks.jax_runs import _xent
    from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax

    x, y = _batch(b)
    batch = (jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
    params0 = torch_mlp_to_jax(_model())

    def loss_fn(p, bt):
        return _xent(jax_mlp_apply(p, bt[0], "relu"), bt[1])

    out = {}
    vg = jax.jit(jax.value_and_grad(loss_fn))
    jax.block_until_ready(vg(params0, batch))
    out["jax_fb"] = ("forward+backward (jit)", _time_window(
        lambda: jax.block_until_ready(vg(params0, batch)), steps, repeats))

    def optax_row(key, label, tx, extra: bool):
        import optax

        # the batch is an argument, not a closure constant (XLA would constant-fold the
        # statistics of a constant batch at compile time)
        @jax.jit
        def step(p, s, bt):
            loss, g = jax.value_and_grad(loss_fn)(p, bt)
            if extra:
                u, s = tx.update(g, s, p, loss_fn=loss_fn, batch=bt)
            else:
                u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        st = {"p": params0, "s": tx.init(params0)}

        def one():
            st["p"], st["s"] = step(st["p"], st["s"], batch)
            jax.block_until_ready(st["p"])

        for _ in range(REFRESH_EVERY):
            one()
        out[key] = (label, _time_window(one, steps, repeats))

    try:
        import optax

        optax_row("jax_adamw", "optax.adamw (jit)", optax.adamw(1e-3, weight_decay=1e-4), False)
    except Exception as e:  # noqa: BLE001
        out["jax_adamw"] = ("optax.adamw (jit)", _err(e))
    try:
        import grng_jax

        tx = grng_jax.ring(LR, rho=0.05, damping=DAMPING, structure="kfac", momentum=0.9,
                           curvature_every=REFRESH_EVERY, inverse_every=REFRESH_EVERY,
                           ema_decay=EMA_DECAY)
        optax_row("jax_ring", "grng_jax RING kfac (jit)", tx, True)
    except Exception as e:  # noqa: BLE001
        out["jax_ring"] = ("grng_jax RING kfac (jit)", _err(e))
    try:
        import kfac_jax

        def kloss(p, bt):
            logits = jax_mlp_apply(p, bt[0], "relu")
            kfac_jax.register_softmax_cross_entropy_loss(logits, bt[1])
            return _xent(logits, bt[1])

        opt = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(kloss), l2_reg=0.0,
            use_adaptive_learning_rate=False, use_adaptive_momentum=False,
            use_adaptive_damping=False, learning_rate_schedule=lambda t: LR,
            momentum_schedule=lambda t: 0.9, damping_schedule=lambda t: DAMPING,
            curvature_ema=EMA_DECAY, inverse_update_period=REFRESH_EVERY,
            curvature_update_period=REFRESH_EVERY, num_burnin_steps=0,
            multi_device=False, estimation_mode="fisher_empirical")
        key = jax.random.PRNGKey(0)
        st = {"p": params0, "s": opt.init(params0, key, batch), "t": 0}

        def kstep():
            st["p"], st["s"], _ = opt.step(st["p"], st["s"], key, batch=batch,
                                           global_step_int=st["t"])
            st["t"] += 1
            jax.block_until_ready(st["p"])

        for _ in range(REFRESH_EVERY):
            kstep()
        out["kfac_jax"] = ("kfac-jax (jit)", _time_window(kstep, steps, repeats))
    except Exception as e:  # noqa: BLE001
        out["kfac_jax"] = ("kfac-jax (jit)", _err(e))
    return out


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())[:140]
    return f"not runnable: {type(e).__name__}: {msg}"


# ---------------------------------------------------------------------------------------------
# the benchmark


def run(batches=(128, 1024), full=False, quick=False, only=None, log=print) -> dict:
    """Every row at every batch size. The rows of one batch size are built and warmed up
    together, then timed round-robin, ``repeats`` windows each, keeping each row's best
    window: a burst of other work on a shared machine then spoils one window of every row
    rather than every window of one row."""
    from benchmarks.__main__ import load_average
    from benchmarks.harness import progress_bar

    tp = Throughput()
    rows = torch_rows(full)
    if only:
        rows = [r for r in rows if r[0] in only or r[0] in ("adamw",)]
    res = {"batches": {}, "refresh_every": REFRESH_EVERY, "sizes": SIZES,
           "threads": torch.get_num_threads(), "load_start": load_average(),
           "peak_square_gflops": tp.of(1024, 1024, 1024) / 1e9}
    n_params = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
    repeats = 1 if quick else 3
    bar = progress_bar(total=len(batches) * (len(rows) + repeats + 1), unit="task")
    for b in batches:
        periods = 1 if quick or b >= 1024 else 2
        out = {"rows": {}}
        x, y = _batch(b)
        fns = reference_fns(b)
        for f in fns.values():
            f()
        with MatmulRecorder() as rec:
            fns["_fb"]()
        fb_ops = rec.ops
        labels = {}
        for key, label, build in rows:
            bar.set_postfix_str(f"b={b} build {key}", refresh=False)
            labels[key] = label
            if "woodbury" in key and b * n_params * 4 > WOODBURY_LIMIT_BYTES:
                out["rows"][key] = {"label": label, "error": (
                    f"skipped: per-example gradients J ({b} x {n_params:,} float32) would "
                    f"take {b * n_params * 4 / 1e9:.1f} GB")}
                bar.update()
                continue
            try:
                stepper = build(_model(), b)
                for _ in range(REFRESH_EVERY):  # one full refresh period of warm-up
                    loss = stepper.step(x, y)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss {loss} during warm-up")
                row = {"label": label}
                if key in GRNG_KEYS or key == "asdl_kfac":
                    with MatmulRecorder() as rec:  # one refresh period: the amortised work
                        for _ in range(REFRESH_EVERY):
                            stepper.step(x, y)
                    own = subtract(rec.ops, fb_ops, REFRESH_EVERY)
                    row["own_flops"] = total_flops(own) / REFRESH_EVERY
                    row["ideal_time"] = tp.ideal_time(own) / REFRESH_EVERY
                out["rows"][key] = row
                fns[key] = functools.partial(stepper.step, x, y)
            except Exception as e:  # noqa: BLE001
                out["rows"][key] = {"label": label, "error": _err(e)}
            bar.update()
        best = dict.fromkeys(fns, math.inf)
        for r in range(repeats):
            bar.set_postfix_str(f"b={b} timing round {r + 1}/{repeats}", refresh=False)
            for key, fn in list(fns.items()):
                n = 5 if key in ("_hvp", "_grad") else REFRESH_EVERY * periods
                try:
                    best[key] = min(best[key], _time_window(fn, n, 1))
                except Exception as e:  # noqa: BLE001
                    out["rows"][key] = {"label": labels.get(key, key), "error": _err(e)}
                    del fns[key]
            bar.update()
        out["fb"] = best.pop("_fb")
        out["hvp_extra"] = best.pop("_hvp") - best.pop("_grad")
        for key, t in best.items():
            if key in fns:
                out["rows"][key]["time"] = t
        out["rows"] = {k: out["rows"][k] for k, _, _ in rows if k in out["rows"]}
        del fns
        bar.set_postfix_str(f"b={b} jax", refresh=False)
        try:
            out["jax"] = {k: {"label": lab, "time": v} if isinstance(v, float) else
                          {"label": lab, "error": v}
                          for k, (lab, v) in jax_rows(b, REFRESH_EVERY * periods,
                                                      repeats).items()}
        except Exception as e:  # noqa: BLE001
            out["jax"] = {"jax": {"label": "JAX", "error": _err(e)}}
        bar.update()
        res["batches"][b] = out
    bar.close()
    res["load_end"] = load_average()
    return res


def _ms(t):
    return "–" if t is None or not math.isfinite(t) else f"{t * 1e3:.2f}"


def _x(a, b):
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "–"
    return f"{a / b:.2f}"


def tables(res: dict) -> str:
    from benchmarks.report import markdown_table

    parts = []
    for b, out in res["batches"].items():
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
        parts.append(f"### torch, batch {b}\n\nforward+backward {_ms(fb)} ms; double-backprop "
                     f"HVP adds {_ms(out['hvp_extra'])} ms.\n\n" + markdown_table(
                         ["optimizer", "step (ms)", "x AdamW", "x fwd+bwd",
                          "own GFLOP/step", "own GFLOP/s", "of matmul peak", "note"], body))
        jx = out.get("jax", {})
        if jx:
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
            parts.append(f"### JAX (jit), batch {b}\n\nforward+backward {_ms(jfb)} ms.\n\n"
                         + markdown_table(["optimizer", "step (ms)", "x AdamW", "x fwd+bwd",
                                           "note"], jb))
    return "\n\n".join(parts)


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


def write(res: dict, outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    md = ["# Step cost: MLP 784-1024-256-10", "",
          f"torch threads {res['threads']}; float32 matmul 1024^3: "
          f"{res['peak_square_gflops']:.1f} GFLOP/s; curvature and inverses every "
          f"{res['refresh_every']} steps; times are the best of the measured windows. "
          f"Load average at start {res.get('load_start')}, at end {res.get('load_end')} "
          "(above the core count, other work shared the machine and the times are inflated).",
          "",
          "## Targets", ""] + targets(res) + ["", tables(res), "", __doc__]
    path = outdir / "stepcost.md"
    path.write_text("\n".join(md), encoding="utf-8")
    (outdir / "stepcost.json").write_text(json.dumps(res, indent=1, default=str),
                                          encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stepcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--quick", action="store_true", help="one window, one refresh period")
    p.add_argument("--full", action="store_true", help="also the heavyball peers")
    p.add_argument("--only", nargs="+", help="row keys (AdamW always runs)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, help="torch threads (default: every core)")
    args = p.parse_args(argv)
    from benchmarks.__main__ import quiet_peer_warnings

    quiet_peer_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    import datetime as _dt

    out = args.out or Path("results") / f"stepcost-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    t0 = time.perf_counter()
    res = run(tuple(args.batches), full=args.full, quick=args.quick, only=args.only)
    path = write(res, out)
    print("\n".join(targets(res)))
    print()
    print(tables(res))
    print(f"\nstep-cost report: {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
