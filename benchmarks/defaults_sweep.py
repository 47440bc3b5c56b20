"""Which settings train the model zoo out of the box: every GRNG optimizer (and AdamW for
scale) on every zoo model (tests/torch/zoo.py) for a fixed number of steps, per candidate
setting; reports skipped steps, factor incidents, non-finite or diverged runs and the loss
drop. The evidence behind the recommended defaults (README "Defaults").

    python -m benchmarks.defaults_sweep [--steps 60] [--settings defaults,...] [--models ...]
                                        [--seeds 0,1,2]   # the models' initialisations
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

CANDIDATES = {
    "defaults": {},
    # the defaults before session 5 (refreshing every step, no trust region)
    "old": dict(lr=0.1, damping=1e-3, kl_clip=None, curvature_every=1, inverse_every=1),
    # session 5's defaults: the trust region, refreshing every step
    "every_step": dict(kl_clip=1e-3, curvature_every=1, inverse_every=1),
    "kl": dict(kl_clip=1e-3),
    "kl_d2": dict(kl_clip=1e-3, damping=1e-2),
    "zoo": dict(lr=0.05, damping=1e-2, kl_clip=1e-3),
    # the defaults without the refresh warm-up (every 10 steps from the first)
    "no_warmup": dict(refresh_warmup=0),
    # session 10: heavy-ball momentum with a tighter trust region
    "m5kl03": dict(momentum=0.5, kl_clip=3e-4),
    "m8kl003": dict(momentum=0.8, kl_clip=3e-5),
}
OPTIMIZERS = {"RING": {}, "RING-gn": dict(form="gauss_newton"), "RENG": {}, "RKalman": {}}


def _run(z, make, steps: int) -> dict:
    opt = make(z.model)
    losses, skipped, incidents = [], 0, 0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(steps):
            out = z.step(opt, k)
            losses.append(float(out.detach()) if out is not None else math.nan)
            if not math.isfinite(losses[-1]) or losses[-1] > 1e3 * max(losses[0], 1.0):
                break
    if hasattr(opt, "describe"):
        rep = opt.describe()
        skipped, incidents = rep.skipped, len(rep.incidents)
    first = sum(losses[:5]) / len(losses[:5])
    last = sum(losses[-10:]) / len(losses[-10:])
    ok = len(losses) == steps and all(map(math.isfinite, losses)) and \
        max(losses) < 1.5 * losses[0] and last < first
    peak = max(range(len(losses)), key=lambda k: losses[k]) if losses else 0
    return dict(first=first, last=last, skipped=skipped, incidents=incidents, ok=ok,
                steps=len(losses), seconds=time.perf_counter() - t0,
                peak=f"{losses[peak]:.3f}@{peak}" if losses else "-")


def main(argv=None) -> None:
    import grng_torch as gt

    from tests.torch.zoo import ZOO

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--settings", default=",".join(CANDIDATES))
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--seeds", default="0", help="model initialisation seeds, e.g. 0,1,2")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'model':20s} {'seed':>4s} {'optimizer':9s} {'setting':9s} {'first':>7s} "
          f"{'last':>7s} {'skip':>4s} {'inc':>3s} ok  max loss@step")
    for model in args.models.split(","):
        for seed in (int(x) for x in args.seeds.split(",")):
            _model_rows(gt, ZOO[model](seed=seed), f"{model:20s} {seed:4d}", args)


def _model_rows(gt, z, head: str, args) -> None:
    """AdamW for scale, then every setting x optimizer from the same initial weights."""
    base = {k: v.clone() for k, v in z.model.state_dict().items()}
    r = _run(z, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), args.steps)
    print(f"{head} {'AdamW':9s} {'1e-3':9s} {r['first']:7.3f} {r['last']:7.3f}")
    for setting in args.settings.split(","):
        for name in args.optimizers.split(","):
            z.model.load_state_dict(base)
            cls = getattr(gt, name.split("-")[0])
            kw = {**CANDIDATES[setting], **OPTIMIZERS[name]}
            r = _run(z, lambda m, cls=cls, kw=kw: cls(m.parameters(), model=m, **kw),
                     args.steps)
            print(f"{head} {name:9s} {setting:9s} {r['first']:7.3f} {r['last']:7.3f} "
                  f"{r['skipped']:4d} {r['incidents']:3d} {'yes' if r['ok'] else 'NO '} "
                  f"{r['peak']}{'' if r['steps'] == args.steps else ' (stopped)'}", flush=True)


if __name__ == "__main__":
    main()
