"""The torch rows of the step-cost microbenchmark: every optimizer's stepper on an MLP (`Net`),
the reference passes (plain forward+backward, double-backprop HVP), and their measurement at
one batch size: FLOPs of the optimizer's own work (GRNG rows and ASDL K-FAC), which K-FAC
layers take the factored form, and round-robin timing.
"""

from __future__ import annotations

import functools
import math

import torch

from benchmarks.flops import MatmulRecorder, subtract, total_flops
from benchmarks.grng_runs import build_grng
from benchmarks.hyperparams import REFRESH_EVERY, common_hp
from benchmarks.optimizers import all_specs
from benchmarks.stepcost_eigh import eigh_floor
from benchmarks.stepcost_setup import (
    DAMPING,
    LR,
    MAIN,
    WOODBURY_LIMIT_BYTES,
    Net,
    kfac_layers,
    not_runnable,
    time_window,
)

GRNG_KEYS = ("ring", "ring_gn", "ring_chol", "ngd", "reng", "reng_fd", "rkalman",
             "ring_woodbury", "rkalman_woodbury")


def gauss_newton_form() -> dict:
    """``{"form": "gauss_newton"}`` where the core's RING has forms (d = (1 − ρλ)U + ρg), else
    {} (that is then its only form)."""
    try:
        from grng_core.config import RINGConfig
    except ImportError:
        return {}
    return {"form": "gauss_newton"} if "form" in RINGConfig.names() else {}


class _Shim:
    """What the optimizer builders read from a task."""

    seq_len = 0

    def __init__(self, b: int):
        self.batch_size = b
        self.n_train = 60_000
        self.structures = {}


def torch_rows(full: bool) -> list[tuple[str, str, callable]]:
    """(key, label, build(model, batch_size) -> stepper) of every torch row."""
    specs = {s.key: s for s in all_specs()}

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
        ("ring_gn", "RING (kfac, gauss_newton form)", grng("ring", "kfac", **gauss_newton_form())),
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
    if not gauss_newton_form():  # one form only: "ring" is it
        rows = [r for r in rows if r[0] != "ring_gn"]
    if full:
        rows += [("psgd_kron", "PSGDKron (heavyball)", peer("psgd_kron")),
                 ("soap", "SOAP (heavyball)", peer("soap")),
                 ("muon", "Muon (heavyball)", peer("muon"))]
    return rows


def reference_fns(b: int, net: Net = MAIN, hvp: bool = True) -> dict:
    """Plain forward+backward and, with ``hvp``, forward + gradient with graph + HVP backward
    (double backprop) next to a plain gradient, as callables."""
    lf = torch.nn.functional.cross_entropy
    x, y = net.batch(b)
    m_fb = net.model()

    def fb():
        m_fb.zero_grad(set_to_none=True)
        lf(m_fb(x), y).backward()

    if not hvp:
        return {"_fb": fb}
    m_h = net.model()
    params = list(m_h.parameters())
    v = [torch.randn_like(p) for p in params]

    def with_hvp():
        g = torch.autograd.grad(lf(m_h(x), y), params, create_graph=True)
        torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

    def plain_grad():
        torch.autograd.grad(lf(m_h(x), y), params)

    return {"_fb": fb, "_hvp": with_hvp, "_grad": plain_grad}


def measure_batch(b: int, rows, tp, repeats: int, periods: int, bar, net: Net = MAIN,
                  hvp: bool = True) -> dict:
    """Every torch row on ``net`` at batch ``b``: built and warmed up together, then timed
    round-robin, ``repeats`` windows each, keeping each row's best window; ``hvp``: also the
    double-backprop reference (RENG's bound)."""
    out = {"rows": {}, "net": net.title, "sizes": list(net.sizes), "batch": b}
    x, y = net.batch(b)
    fns = reference_fns(b, net, hvp)
    for f in fns.values():
        f()
    with MatmulRecorder() as rec:
        fns["_fb"]()
    fb_ops = rec.ops
    labels = {}
    for key, label, build in rows:
        bar.set_postfix_str(f"{net.sizes[1]}/b={b} build {key}", refresh=False)
        labels[key] = label
        out["rows"][key], fn = _prepare_row(key, label, build, (b, x, y, net), tp, fb_ops)
        if fn is not None:
            fns[key] = fn
        bar.update()
    best = _time_round_robin(b, fns, out["rows"], labels, (repeats, periods, net.sync), bar)
    out["fb"] = best.pop("_fb")
    if hvp:
        out["hvp_extra"] = best.pop("_hvp") - best.pop("_grad")
    for key, t in best.items():
        if key in fns:
            out["rows"][key]["time"] = t
    out["rows"] = {k: out["rows"][k] for k, _, _ in rows if k in out["rows"]}
    return out


def factored_applies(key: str, stepper) -> bool | None:
    """Whether the row's optimizer can take K-FAC's factored form (None: not a K-FAC row)."""
    if key == "asdl_kfac":
        return False
    if key not in GRNG_KEYS or "woodbury" in key:
        return None
    try:
        core = stepper.opt.core(0)
        r = core.requirements
        return bool(core.config.structure == "kfac" and (r.layer_rows or r.fd_rows))
    except (AttributeError, IndexError, TypeError):
        return None


def passes_preconditioned(stepper) -> int:
    """Gradients whose rows the preconditioned vector stacks (`stacked_passes`): 1 (g itself),
    2 or 3 for a finite-difference ĝ with the shifted passes' rows (§2.1)."""
    try:
        from grng_core.requirements import stacked_passes

        return stacked_passes(stepper.opt.core(0).config)
    except (AttributeError, IndexError, TypeError, ImportError):
        return 1


def _prepare_row(key, label, build, data, tp, fb_ops):
    """(row dict, the timed step or None): build and warm up one refresh period; for the GRNG
    rows and ASDL count the FLOPs of the optimizer's own work over one more period and list
    the K-FAC layers with their form (``data``: batch size, x, y, the `Net`)."""
    b, x, y, net = data
    if "woodbury" in key and b * net.n_params * 4 > WOODBURY_LIMIT_BYTES:
        return {"label": label, "error": (
            f"skipped: per-example gradients J ({b} x {net.n_params:,} float32) would "
            f"take {b * net.n_params * 4 / 1e9:.1f} GB")}, None
    try:
        stepper = build(net.model(), b)
        for _ in range(REFRESH_EVERY):  # one full refresh period of warm-up
            loss = stepper.step(x, y)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} during warm-up")
        row = {"label": label}
        applies = factored_applies(key, stepper)
        if applies is not None:
            row["factored_applies"] = applies
            row["kfac_layers"] = kfac_layers(net.sizes, b * passes_preconditioned(stepper))
        if key in GRNG_KEYS or key == "asdl_kfac":
            with MatmulRecorder() as rec:  # one refresh period: the amortised work
                for _ in range(REFRESH_EVERY):
                    stepper.step(x, y)
            own = subtract(rec.ops, fb_ops, REFRESH_EVERY)
            row["own_flops"] = total_flops(own) / REFRESH_EVERY
            row["ideal_time"] = tp.ideal_time(own) / REFRESH_EVERY
        floor = eigh_floor(stepper)
        if floor is not None:
            row["eigh_floor"] = floor
        return row, functools.partial(stepper.step, x, y)
    except Exception as e:
        return {"label": label, "error": not_runnable(e)}, None


def _time_round_robin(b, fns: dict, rows: dict, labels: dict, plan, bar) -> dict:
    """Best seconds per call of every callable, over ``repeats`` rounds of one window each
    (``plan``: repeats, refresh periods per window, the device's sync); a callable that raises
    is dropped from ``fns`` and its row gets the error."""
    repeats, periods, sync = plan
    best = dict.fromkeys(fns, math.inf)
    for r in range(repeats):
        bar.set_postfix_str(f"b={b} timing round {r + 1}/{repeats}", refresh=False)
        for key, fn in list(fns.items()):
            n = 5 if key in ("_hvp", "_grad") else REFRESH_EVERY * periods
            try:
                best[key] = min(best[key], time_window(fn, n, 1, sync))
            except Exception as e:
                rows[key] = {"label": labels.get(key, key), "error": not_runnable(e)}
                del fns[key]
        bar.update()
    return best
