"""The JAX half of benchmarks/defaults_sweep.py: the flax.linen zoo (tests/jax/zoo_flax.py: a
CNN on digits, a character transformer) with grng_jax's optimizers per candidate setting and
optax.adamw for scale, jitted; reports skipped steps, divergence and the loss drop.

    python -m benchmarks.defaults_sweep_jax [--steps 60] [--settings defaults,...] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import math

from benchmarks.defaults_sweep import CANDIDATES

OPTIMIZERS = {"ring": {}, "ring-gn": dict(form="gauss_newton"), "reng": {}, "rkalman": {}}


def _run(model, params, batch, opt, steps: int) -> dict:
    import jax
    import optax

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]),
                                                               b[1]).mean()

    state = opt.init(params)

    @jax.jit
    def step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=b)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for k in range(steps):
        params, state, loss = step(params, state, batch(k))
        losses.append(float(loss))
        if not math.isfinite(losses[-1]) or losses[-1] > 1e3 * max(losses[0], 1.0):
            break
    skipped = int(getattr(getattr(state, "core", None), "skipped", 0))
    first = sum(losses[:5]) / len(losses[:5])
    last = sum(losses[-10:]) / len(losses[-10:])
    ok = len(losses) == steps and all(map(math.isfinite, losses)) and \
        max(losses) < 1.5 * losses[0] and last < first and skipped == 0
    return dict(first=first, last=last, skipped=skipped, ok=ok, steps=len(losses))


def _jax_kw(kw: dict) -> dict:
    out = dict(kw)
    if "kl_clip" in out and out["kl_clip"] is None:
        out["kl_clip"] = float("inf")  # grng_jax: None keeps the default
    if "lr" in out:
        out["learning_rate"] = out.pop("lr")
    return out


def main(argv=None) -> None:
    import grng_jax
    import optax

    from tests.jax import zoo_flax as Z

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--settings", default=",".join(CANDIDATES))
    ap.add_argument("--seeds", default="0", help="model initialisation seeds, e.g. 0,1,2")
    args = ap.parse_args(argv)
    digits, (x, _) = Z.digits_batches()
    text = Z.text_batches()
    models = {"flax_cnn": (Z.CNN(), digits, x[:1]),
              "flax_char_transformer": (Z.CharTransformer(), text, text(0)[0])}
    print(f"{'model':22s} {'seed':>4s} {'optimizer':9s} {'setting':9s} {'first':>7s} "
          f"{'last':>7s} {'skip':>4s} ok")
    for name, (model, batch, example) in models.items():
        for seed in (int(v) for v in args.seeds.split(",")):
            params = Z.init(model, example, seed)
            head = f"{name:22s} {seed:4d}"
            r = _run(model, params, batch, optax.adamw(1e-3), args.steps)
            print(f"{head} {'adamw':9s} {'1e-3':9s} {r['first']:7.3f} {r['last']:7.3f}")
            for setting in args.settings.split(","):
                for opt_name, extra in OPTIMIZERS.items():
                    kw = _jax_kw({**CANDIDATES[setting], **extra})
                    opt = getattr(grng_jax, opt_name.split("-")[0])(**kw)
                    r = _run(model, params, batch, opt, args.steps)
                    print(f"{head} {opt_name:9s} {setting:9s} {r['first']:7.3f} "
                          f"{r['last']:7.3f} {r['skipped']:4d} {'yes' if r['ok'] else 'NO'}"
                          f"{'' if r['steps'] == args.steps else ' (stopped)'}", flush=True)


if __name__ == "__main__":
    main()
