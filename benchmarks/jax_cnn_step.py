"""A jitted `grng_jax.ring` step with SciPy's BLAS at GRNG's one thread and at its own default
(README "JAX (optax)", "CPU threads"): a small flax CNN (conv 16-16-32s2-32, 3x3, a dense
head; batch 64 of 16x16x1) or the step-cost MLP (784-1024-256-10, batch 128), float32; the
mean step (best of 5 windows of 100 steps) and the median step at each position of the refresh
period (statistics and inverses every 10 steps). Each setting runs in its own process (the
BLAS threads are set once per process).

    python -m benchmarks.jax_cnn_step [--model cnn|mlp] [--form gauss_newton|adaptive_damping]
                                      [--algorithm ring|reng|rkalman]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"GRNG default (SciPy's BLAS: 1 thread)": "1",
            "GRNG_JAX_LAPACK_THREADS=0 (SciPy's default threads)": "0"}


def _model(name: str):
    import flax.linen as nn
    import jax

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width, stride in ((16, 1), (16, 1), (32, 2), (32, 1)):
                x = nn.relu(nn.Conv(width, (3, 3), strides=stride)(x))
            return nn.Dense(10)(x.mean((1, 2)))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(1024)(x))
            return nn.Dense(10)(nn.tanh(nn.Dense(256)(x)))

    key = jax.random.PRNGKey(0)
    shape = (64, 16, 16, 1) if name == "cnn" else (128, 784)
    batch = (jax.random.normal(key, shape), jax.random.randint(key, shape[:1], 0, 10))
    return (CNN() if name == "cnn" else MLP()), batch


def measure(model_name: str, form: str, algorithm: str = "ring") -> dict:
    import grng_jax
    import jax
    import optax

    model, batch = _model(model_name)
    params = model.init(jax.random.PRNGKey(0), batch[0])

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]),
                                                               b[1]).mean()

    opt = grng_jax.ring(form=form) if algorithm == "ring" else getattr(grng_jax, algorithm)()
    state = opt.init(params)

    @jax.jit
    def step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=b)
        return optax.apply_updates(p, u), s, loss

    for _ in range(25):  # compile, and the warm-up's refreshes
        params, state, loss = step(params, state, batch)
    loss.block_until_ready()
    windows = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(100):
            params, state, loss = step(params, state, batch)
        loss.block_until_ready()
        windows.append((time.perf_counter() - t) * 10)
    at: list[list[float]] = [[] for _ in range(10)]
    for i in range(200):
        t = time.perf_counter()
        params, state, loss = step(params, state, batch)
        loss.block_until_ready()
        at[i % 10].append((time.perf_counter() - t) * 1e3)
    return {"mean_ms": min(windows), "by_position_ms": [statistics.median(v) for v in at]}


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    ap.add_argument("--form", choices=("gauss_newton", "adaptive_damping"),
                    default="gauss_newton")
    ap.add_argument("--algorithm", choices=("ring", "reng", "rkalman"), default="ring",
                    help="at its defaults (--form applies to ring)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.form, args.algorithm)))
        return
    print(f"{args.algorithm} ({'form=' + args.form if args.algorithm == 'ring' else 'defaults'})"
          f", {args.model}")
    for label, value in SETTINGS.items():
        env = dict(os.environ, GRNG_JAX_LAPACK_THREADS=value, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, "-m", "benchmarks.jax_cnn_step", "--one",
                              "--model", args.model, "--form", args.form,
                              "--algorithm", args.algorithm],
                             env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        pos = r["by_position_ms"]
        print(f"{label}: {r['mean_ms']:.1f} ms a step; by position in the refresh period "
              f"(ms): {' '.join(f'{x:.1f}' for x in pos)}; slowest {max(pos):.1f}, the "
              f"others' median {statistics.median(sorted(pos)[:-1]):.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
