"""Memory soak: resident memory must not grow with the number of steps.

    python -m tests.reliability.memory_soak                      # the full soak: 2,000 steps
    python -m tests.reliability.memory_soak --steps 300 --warmup 100 --modes torch-core

Modes (each prints one JSON line per optimizer: RSS after warm-up, at the end, growth in %):
- torch-core: RENG (structure kfac, gr="double_backprop") through the core on a small torch
  MLP; the Hessian-vector product comes from torch.autograd.grad(create_graph=True) inside
  the oracle, K-FAC statistics from the layer inputs and output gradients.
- torch-adapter: grng_torch.RENG(gr="double_backprop") on nn.Sequential (when importable).
- jax-core: every optimizer (RENG, RING, R-Kalman; with --all-structures each of kfac,
  diagonal, woodbury) through the core under jax.jit, on the reference MLP.
- jax-adapter: grng_jax.reng / ring / rkalman under jax.jit (when importable).
A fresh batch every step. RSS is read from /proc/self/statm (Linux). Exit status 1 when any
growth reaches --limit (default 5 %).
"""

from __future__ import annotations

import argparse
import gc as pygc
import json
import os
import sys
import time

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def soak(name, step, steps, warmup, sample_every=50) -> dict:
    """Run `step(i)` `steps` times; RSS after `warmup` steps vs. the end (and the maximum)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    pygc.collect()
    base = rss_mb()
    peak = base
    for i in range(warmup, steps):
        step(i)
        if (i + 1) % sample_every == 0:
            peak = max(peak, rss_mb())
    pygc.collect()
    end = rss_mb()
    return {"run": name, "steps": steps, "warmup": warmup, "rss_after_warmup_mb": round(base, 1),
            "rss_end_mb": round(end, 1), "growth_pct": round(100 * (end - base) / base, 3),
            "max_growth_pct": round(100 * (max(peak, end) - base) / base, 3),
            "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------ torch
def torch_core(steps, warmup):
    import torch
    import torch.nn.functional as F

    import grng_core as gc

    torch.manual_seed(0)
    sizes, B = (16, 64, 64, 10), 32
    params = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        params += [torch.randn(d_out, d_in) / d_in**0.5, torch.zeros(d_out)]
    n_layers = len(sizes) - 1
    layers = [gc.LayerSpec(2 * k, 2 * k + 1) for k in range(n_layers)]
    opt = gc.reng(lr=0.02, rho=0.05, damping=1e-2, structure="kfac", gr="double_backprop",
                  momentum=0.5)
    state = opt.init(params, layers=layers)

    def forward(p, x):
        a, inputs, zs = x, [], []
        for k in range(n_layers):
            inputs.append(a)
            z = a @ p[2 * k].T + p[2 * k + 1]
            zs.append(z)
            a = torch.tanh(z) if k < n_layers - 1 else z
        return z, inputs, zs

    def step(i):
        nonlocal params, state
        g = torch.Generator().manual_seed(i)
        x = torch.randn(B, sizes[0], generator=g)
        y = torch.randint(0, sizes[-1], (B,), generator=g)
        p = [t.detach().requires_grad_(True) for t in params]
        out, inputs, zs = forward(p, x)
        loss = F.cross_entropy(out, y)
        got = torch.autograd.grad(loss, p + zs)
        grads, zgrads = list(got[:len(p)]), got[len(p):]
        stats = gc.Stats(layers=[gc.LayerStats(2 * k, 2 * k + 1, inputs[k].detach(),
                                               B * zgrads[k]) for k in range(n_layers)])

        def hvp_fn(params_, v):  # double backprop: the graph lives inside this call only
            q = [t.detach().requires_grad_(True) for t in params_]
            gq = torch.autograd.grad(F.cross_entropy(forward(q, x)[0], y), q, create_graph=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(gq, v))
            return list(torch.autograd.grad(dot, q))

        updates, state = opt.update(grads, state, params, stats=stats,
                                    oracle=gc.Oracle(hvp_fn=hvp_fn))
        params = gc.apply_updates(params, updates)
        last["loss"] = float(loss.detach())

    last = {}
    res = soak("torch-core reng kfac double_backprop", step, steps, warmup)
    res.update(skipped=int(state.skipped), final_loss=round(last["loss"], 4))
    return [res]


def torch_adapter(steps, warmup):
    import grng_torch
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 10))
    crit = nn.CrossEntropyLoss()
    opt = grng_torch.RENG(model.parameters(), lr=0.02, rho=0.05, damping=1e-2, model=model,
                          loss_fn=crit, structure="kfac", gr="double_backprop", momentum=0.5)

    def step(i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(32, 16, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)

        def closure():
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            return loss

        last["loss"] = float(opt.step(closure).detach())

    last = {}
    res = soak("torch-adapter RENG kfac double_backprop", step, steps, warmup)
    res["final_loss"] = round(last["loss"], 4)
    return [res]


# ------------------------------------------------------------------ jax
def _jax_setup():
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def jax_core(steps, warmup, all_structures=False, ns_max_iter=None):
    jax = _jax_setup()
    import jax.numpy as jnp

    import grng_core as gc
    from grng_core.reference import MLP

    mlp = MLP((16, 32, 10), activation="tanh")
    layers = [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]
    from tests import cases

    # every optimizer x structure of the tests' table, or each optimizer as built by default
    runs = cases.select(default_estimator=True, bare=True) if all_structures \
        else cases.defaults()
    out = []
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((64, 32, 16)))
    ys = jnp.asarray(np.eye(10)[rng.integers(0, 10, (64, 32))])
    for case in runs:
        alg, structure = case.optimizer, case.structure
        lr = 0.5 if alg == "rkalman" else 0.05
        extra = {} if ns_max_iter is None else {"ns_max_iter": ns_max_iter}
        opt = case.build(lr=lr, **extra)
        params = jax.device_put(mlp.init(0, like=xs[0]), jax.devices()[0])
        state = opt.init(params, layers=layers if structure == "kfac" else None)
        req = opt.requirements

        @jax.jit
        def train(params, state, x, y, opt=opt, req=req):
            b = mlp.batch(params, x, y, per_example=req.per_example_grads,
                          layer_stats=req.layer_stats)
            stats = gc.Stats(per_example_grads=b.per_example_grads, layers=b.layers)
            updates, state = opt.update(b.grads, state, params, stats=stats,
                                        oracle=mlp.oracle(x, y))
            return gc.apply_updates(params, updates), state

        box = {"p": params, "s": state}

        def step(i, train=train, box=box):
            box["p"], box["s"] = train(box["p"], box["s"], xs[i % 64], ys[i % 64])
            if i % 100 == 0:
                jax.block_until_ready(box["p"])

        res = soak(f"jax-core {alg} {structure}", step, steps, warmup)
        res.update(compiled=train._cache_size(), skipped=int(box["s"].skipped),
                   final_loss=round(float(mlp.loss(box["p"], xs[0], ys[0])), 4))
        out.append(res)
    return out


def jax_adapter(steps, warmup):
    jax = _jax_setup()
    import grng_jax
    import jax.numpy as jnp
    import optax

    def logits(params, x):
        for i, layer in enumerate(params):
            x = grng_jax.dense(x, layer["kernel"], layer["bias"])
            if i < len(params) - 1:
                x = jnp.tanh(x)
        return x

    def loss_fn(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()

    keys = jax.random.split(jax.random.key(0), 2)
    params0 = [grng_jax.init_dense(keys[0], 16, 32), grng_jax.init_dense(keys[1], 32, 10)]
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((64, 32, 16)), dtype=jnp.float32)
    ys = jnp.asarray(rng.integers(0, 10, (64, 32)))
    out = []
    from tests import cases

    for case in cases.defaults():  # each optimizer as built by default
        name = case.optimizer
        opt = case.jax(0.5 if name == "rkalman" else 0.05)
        box = {"p": params0, "s": opt.init(params0)}

        @jax.jit
        def train(p, s, x, y, opt=opt):
            g = jax.grad(loss_fn)(p, (x, y))
            u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=(x, y))
            return optax.apply_updates(p, u), s

        def step(i, train=train, box=box):
            box["p"], box["s"] = train(box["p"], box["s"], xs[i % 64], ys[i % 64])
            if i % 100 == 0:
                jax.block_until_ready(box["p"])

        res = soak(f"jax-adapter {name}", step, steps, warmup)
        res["compiled"] = train._cache_size()
        out.append(res)
    return out


MODES = {"torch-core": torch_core, "torch-adapter": torch_adapter, "jax-core": jax_core,
         "jax-adapter": jax_adapter}


def available(mode) -> bool:
    import importlib.util

    need = {"torch-core": "torch", "torch-adapter": "grng_torch", "jax-core": "jax",
            "jax-adapter": "grng_jax"}[mode]
    return importlib.util.find_spec(need) is not None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--limit", type=float, default=5.0, help="allowed growth in percent")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--all-structures", action="store_true",
                    help="jax-core: every optimizer x structure, not the defaults")
    ap.add_argument("--ns-max-iter", type=int, default=None,
                    help="jax-core: a shorter Newton–Schulz budget (a cheaper step, for CI)")
    args = ap.parse_args(argv)
    if not os.path.exists("/proc/self/statm"):
        print("memory_soak needs /proc/self/statm (Linux)", file=sys.stderr)
        return 2
    worst = 0.0
    for mode in args.modes.split(","):
        if not available(mode):
            print(json.dumps({"run": mode, "skipped": "not importable"}), flush=True)
            continue
        kw = {}
        if mode == "jax-core":
            kw = {"all_structures": args.all_structures, "ns_max_iter": args.ns_max_iter}
        for res in MODES[mode](args.steps, args.warmup, **kw):
            print(json.dumps(res), flush=True)
            worst = max(worst, res["growth_pct"])
    return 0 if worst < args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
