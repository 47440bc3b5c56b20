"""GPU checks the test suite has no machine for: ``python -m benchmarks.gpu_smoke`` (run by
benchmarks/gpu_check.sh on a machine with an NVIDIA GPU).

- torch: RING, RENG and R-Kalman (kfac) on CUDA give the CPU's parameters after a few steps,
  in float32 and float64; a checkpoint (the portable ``opt.save`` / ``opt.load`` and torch's
  ``state_dict``) written on one device continues on the other, CUDA -> CPU and CPU -> CUDA;
- JAX: ``grng_jax.ring`` on the default backend (the GPU) gives the CPU's parameters, in
  float32 and float64, and ``grng_jax.save`` on the GPU loads on the CPU.

Each check prints ``PASS name`` or ``FAIL name: why`` (``SKIP`` where the device is missing);
the last line is ``gpu_smoke: P passed, F failed, S skipped`` and the exit status is 1 when a
check failed. float32 comparisons use highest matmul precision (no TF32) and rtol 2e-3;
float64 rtol 1e-8.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

SIZES = (20, 16, 3)
TOL = {"float32": 2e-3, "float64": 1e-8}
ALGOS = ("RING", "RENG", "RKalman")


def _close(a, b, dtype: str, what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(y)), 1e-12)
        err = float(np.max(np.abs(x - y)) / scale)
        if not err <= TOL[dtype]:
            raise AssertionError(f"{what}: leaf {i} differs by {err:.3g} (relative to its max; "
                                 f"tolerance {TOL[dtype]:g})")


# --------------------------------------------------------------------------------- torch


def _torch_setup(dtype: str, device: str, algo: str):
    import grng_torch
    import torch

    from benchmarks.models import mlp

    torch.manual_seed(0)
    model = mlp(SIZES, "tanh").to(device=device, dtype=getattr(torch, dtype))
    loss_fn = torch.nn.CrossEntropyLoss()
    hp = dict(lr=0.1, rho=0.05, damping=0.1, structure="kfac", curvature_every=2,
              inverse_every=2, refresh_warmup=0)  # steps that refresh nothing, too
    opt = getattr(grng_torch, algo)(model.parameters(), model=model, loss_fn=loss_fn, **hp)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, SIZES[0], generator=g).to(device=device, dtype=getattr(torch, dtype))
    y = torch.randint(0, SIZES[-1], (32,), generator=g).to(device)
    return model, opt, loss_fn, x, y


def _torch_steps(setup, n: int) -> None:
    model, opt, loss_fn, x, y = setup

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(n):
        opt.step(closure)


def _params(model) -> list:
    return [p.detach().cpu().double().numpy() for p in model.parameters()]


def torch_matches_cpu(dtype: str, algo: str, dev: str = "cuda") -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = _torch_setup(dtype, "cpu", algo), _torch_setup(dtype, dev, algo)
    for s in (cpu, gpu):
        _torch_steps(s, 5)
    _close(_params(gpu[0]), _params(cpu[0]), dtype, f"{algo} cuda vs cpu")


def torch_checkpoint_moves(dtype: str, src: str, dst: str, how: str) -> None:
    """Save after 3 steps on ``src``, load into a fresh optimizer on ``dst`` (its model given
    the same weights), 2 more steps on both: the same parameters."""
    import torch

    a = _torch_setup(dtype, src, "RING")
    _torch_steps(a, 3)
    b = _torch_setup(dtype, dst, "RING")
    with torch.no_grad():
        for p, q in zip(b[0].parameters(), a[0].parameters()):
            p.copy_(q.to(p.device))
    if how == "portable":
        with tempfile.TemporaryDirectory() as d:
            a[1].save(Path(d) / "opt.npz")
            b[1].load(Path(d) / "opt.npz")
    else:
        buf = io.BytesIO()
        torch.save(a[1].state_dict(), buf)
        buf.seek(0)
        b[1].load_state_dict(torch.load(buf, map_location=dst, weights_only=True))
    _torch_steps(a, 2)
    _torch_steps(b, 2)
    _close(_params(b[0]), _params(a[0]), dtype, f"checkpoint {src} -> {dst} ({how})")


# ----------------------------------------------------------------------------------- JAX


def _jax_run(dtype: str, device, n: int, start=None):
    """(params, state, tx) of grng_jax.ring after ``n`` steps on ``device``, from the start or
    from ``start`` = (params as NumPy arrays, state(tx, params) -> the optimizer state)."""
    import grng_jax
    import jax
    import optax
    import torch

    from benchmarks.losses import jax_xent
    from benchmarks.models import jax_mlp_apply, mlp, torch_mlp_to_jax

    torch.manual_seed(0)
    init = torch_mlp_to_jax(mlp(SIZES, "tanh")) if start is None else start[0]
    with jax.default_device(device):
        params = jax.tree_util.tree_map(lambda v: jax.numpy.asarray(np.asarray(v), dtype), init)
        rng = np.random.default_rng(1)
        batch = (jax.numpy.asarray(rng.standard_normal((32, SIZES[0])), dtype),
                 jax.numpy.asarray(rng.integers(0, SIZES[-1], 32)))
        tx = grng_jax.ring(0.1, rho=0.05, damping=0.1, structure="kfac", curvature_every=2,
                           inverse_every=2, refresh_warmup=0)

        def loss(p, bt):
            return jax_xent(jax_mlp_apply(p, bt[0], "tanh"), bt[1])

        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p, batch), s, p, loss_fn=loss, batch=batch)
            return optax.apply_updates(p, u), s

        s = tx.init(params) if start is None else start[1](tx, params)
        for _ in range(n):
            params, s = step(params, s)
        return params, s, tx


def _jax_devices(devices):
    import jax

    gpu, cpu = devices or (jax.devices()[0], jax.devices("cpu")[0])
    if devices is None and gpu.platform == "cpu":
        raise _Skip("JAX's default backend is the CPU (pip install 'jax[cuda12]')")
    return gpu, cpu


def jax_matches_cpu(dtype: str, devices=None) -> None:
    import jax

    gpu, cpu = _jax_devices(devices)
    pg, _, _ = _jax_run(dtype, gpu, 5)
    pc, _, _ = _jax_run(dtype, cpu, 5)
    _close(jax.tree_util.tree_leaves(pg), jax.tree_util.tree_leaves(pc), dtype,
           "grng_jax gpu vs cpu")


def jax_checkpoint_moves(dtype: str, devices=None) -> None:
    """3 steps on the GPU, grng_jax.save; load on the CPU with the params copied, 3 more steps:
    the parameters of 6 steps on the GPU."""
    import grng_jax
    import jax

    gpu, cpu = _jax_devices(devices)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "opt.npz"
        p3, s, tx = _jax_run(dtype, gpu, 3)
        grng_jax.save(path, tx, s)
        host = jax.tree_util.tree_map(np.asarray, p3)
        pc, _, _ = _jax_run(dtype, cpu, 3,
                            start=(host, lambda t, p: grng_jax.load(path, t, t.init(p))))
    pg, _, _ = _jax_run(dtype, gpu, 6)
    _close(jax.tree_util.tree_leaves(pc), jax.tree_util.tree_leaves(pg), dtype,
           "grng_jax checkpoint gpu -> cpu")


class _Skip(Exception):
    pass


def checks(which: str) -> list:
    """(name, callable) of the checks of ``which``: "torch", "jax" or "all"."""
    out = []
    if which in ("torch", "all"):
        for dt in ("float32", "float64"):
            out += [(f"torch {a} {dt} cuda == cpu", lambda a=a, dt=dt: torch_matches_cpu(dt, a))
                    for a in ALGOS]
            out += [(f"torch checkpoint {s}->{t} {how} {dt}",
                     lambda s=s, t=t, how=how, dt=dt: torch_checkpoint_moves(dt, s, t, how))
                    for s, t in (("cuda", "cpu"), ("cpu", "cuda"))
                    for how in ("portable", "state_dict")]
    if which in ("jax", "all"):
        for dt in ("float32", "float64"):
            out += [(f"jax ring {dt} gpu == cpu", lambda dt=dt: jax_matches_cpu(dt)),
                    (f"jax checkpoint gpu->cpu {dt}", lambda dt=dt: jax_checkpoint_moves(dt))]
    return out


def _prepare(which: str) -> str | None:
    """Why the checks cannot run at all, or None (x64 and exact matmuls set for JAX)."""
    if which in ("torch", "all"):
        import torch

        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device"
    if which in ("jax", "all"):
        import jax

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "highest")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", default="all", choices=("torch", "jax", "all"))
    args = p.parse_args(argv)
    why = _prepare(args.which)
    if why:
        print(f"FAIL setup: {why}")
        print("gpu_smoke: 0 passed, 1 failed, 0 skipped")
        return 1
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for name, fn in checks(args.which):
        try:
            fn()
            status, note = "PASS", ""
        except _Skip as e:
            status, note = "SKIP", f": {e}"
        except Exception as e:  # report every failure, keep going
            status, note = "FAIL", f": {type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
        counts[status] += 1
        print(f"{status} {name}{note}", flush=True)
    print(f"gpu_smoke: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
