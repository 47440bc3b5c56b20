"""Train the reference MLP on sklearn's digits with grng_cupy: CuPy on a GPU, NumPy otherwise.

    python examples/digits_cupy.py                       # RING + woodbury, CuPy if a GPU exists
    python examples/digits_cupy.py --optimizer reng --structure kfac --device cpu
    python examples/digits_cupy.py --checkpoint /tmp/opt.npz   # save, reload, keep training

The model computes its own gradients (grng_core.reference.MLP: hand-written backward and
Hessian-vector products), as a CuPy training stack would: the optimizer only receives arrays
and callables, and updates the parameter arrays in place.
"""

from __future__ import annotations

import argparse
import sys
import time

import grng_cupy
import numpy as np

import grng_core as gc
from grng_core.reference import MLP, load_digits_split


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def array_module(device: str):
    """(module, name): cupy for 'gpu' (or 'auto' with a GPU), numpy otherwise."""
    if device == "gpu" or (device == "auto" and gpu_available()):
        if not gpu_available():
            raise SystemExit("--device gpu: CuPy or a CUDA GPU is not available")
        import cupy

        return cupy, "cupy"
    return np, "numpy"


def build(name: str, params, structure: str, mlp: MLP, lr: float | None):
    layers = [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]
    if lr is None and name != "rkalman":
        lr = 0.01 if structure == "diagonal" else 0.1  # Adam-like steps: a smaller rate
    if name == "ring":
        return grng_cupy.RING(params, lr=lr, rho=0.05, damping=1e-2,
                              structure=structure, layers=layers)
    if name == "reng":
        return grng_cupy.RENG(params, lr=lr, rho=0.05, damping=1e-2,
                              structure=structure, layers=layers)
    return grng_cupy.RKalman(params, lr=lr or 0.5, rho=0.05, structure=structure,
                             layers=layers)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=("ring", "reng", "rkalman"), default="ring")
    ap.add_argument("--structure", choices=("kfac", "diagonal", "woodbury"), default="woodbury")
    ap.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--checkpoint", default=None,
                    help="save the optimizer state here after each epoch and reload it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    xp, lib = array_module(args.device)
    data = load_digits_split(seed=args.seed)
    dtype = getattr(xp, args.dtype)
    x_train, y_train = xp.asarray(data.x_train, dtype=dtype), xp.asarray(data.y_train, dtype=dtype)
    x_test = xp.asarray(data.x_test, dtype=dtype)
    labels_test = data.labels_test

    mlp = MLP((64, args.hidden, 10), activation="tanh", loss="softmax_ce")
    params = [xp.asarray(p, dtype=dtype) for p in mlp.init(seed=args.seed)]
    opt = build(args.optimizer, params, args.structure, mlp, args.lr)
    req = opt.requirements
    print(f"{opt!r} on {lib} ({args.dtype}); needs: per-example grads="
          f"{req.per_example_grads}, layer stats={req.layer_stats}, grad_fn={req.grad_fn}, "
          f"hvp_fn={req.hvp_fn}")

    rng = np.random.default_rng(args.seed)
    n = x_train.shape[0]
    steps, acc = 0, 0.0
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(n)
        losses = []
        for i in range(0, n - args.batch_size + 1, args.batch_size):
            idx = xp.asarray(order[i:i + args.batch_size])
            x, y = x_train[idx], y_train[idx]
            need = opt.needs_stats()
            b = mlp.batch(params, x, y, per_example=need and req.per_example_grads,
                          layer_stats=need and req.layer_stats)
            stats = gc.Stats(per_example_grads=b.per_example_grads, layers=b.layers)
            oracle = mlp.oracle(x, y)  # grad_fn / hvp_fn on this batch (pure functions)
            opt.step(b.grads, stats=stats if need else None, grad_fn=oracle.grad_fn,
                     hvp_fn=oracle.hvp_fn)
            losses.append(float(b.loss))
            steps += 1
            if args.max_steps is not None and steps >= args.max_steps:
                break
        pred = np.asarray(xp.argmax(mlp.forward(params, x_test), axis=1).tolist())
        acc = float(np.mean(pred == labels_test))
        print(f"epoch {epoch}: mean train loss {np.mean(losses):.4f}, test accuracy "
              f"{acc:.4f}, {steps} steps, {time.perf_counter() - t0:.1f}s")
        if args.checkpoint:
            opt.save(args.checkpoint)
            opt.load(args.checkpoint)  # round trip: training continues from the file
        if args.max_steps is not None and steps >= args.max_steps:
            break
    return acc


if __name__ == "__main__":
    main(sys.argv[1:])
