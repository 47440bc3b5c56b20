"""Cross-backend consistency: the same training run on every installed array library.

    python -m grng_core.consistency                     # float64, 20 steps, tolerance 1e-10
    python -m grng_core.consistency --dtype float32     # tolerance 2e-3 (see FLOAT32_TOL)
    python -m grng_core.consistency --quick             # 6 configurations, 5 steps, small
    python -m grng_core.consistency --backends numpy,torch --steps 50 --tol 1e-12

For every optimizer x structure x estimator (RING has no estimator) the reference MLP
(`grng_core.reference.MLP`, hand-written gradients, per-example gradients, K-FAC statistics and
Hessian-vector products) is trained from the same initial weights on the same minibatches of
sklearn's digits, with the core API directly (`opt.init`, `opt.update(..., curvature=,
inverse=)` with the host's `opt.flags(step)`, `gc.apply_updates`), on NumPy,
array-api-strict, PyTorch (CPU), JAX (jit, x64 enabled) and CuPy (where a GPU exists).

The measure, per backend pair: the largest over steps, over parameter leaves (after every step)
and over the final optimizer state's arrays of ‖a − b‖ / max(‖a‖, ‖b‖) (Frobenius norms; a pair
of zero arrays counts 0). A non-finite value or a failed run counts as infinity.
The command prints one row per configuration and one column per backend pair, and exits with
status 1 when a difference is above the tolerance (ALGORITHMS.md §4: 1e-10 in float64).

float32 tolerance: FLOAT32_TOL = 2e-3. Rounding differs between libraries (BLAS kernels,
reduction order) by about 1e-7 per operation and the differences grow along a run, most through
the finite-difference estimator ((g+ - g)/eps with eps = fd_radius/|g| cancels digits) and the
woodbury B x B solve (condition ~ |J J^T| / (damping B)). Measured on a 2-core x86_64 CPU
(20 steps, default settings): largest 4.1e-4 (reng/woodbury/fin_diff, numpy vs jax), about what
float32 itself costs (the same numpy run in float32 vs float64 differs by 2.3e-4); the runs
with neither finite differences nor a RENG/RING woodbury solve stay below 1e-5. The bound has a
5x margin; float32 checks the float32 code paths (dtypes, no overflow), float64 (1e-10,
measured largest 7e-13) checks the math.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FLOAT64_TOL = 1e-10
FLOAT32_TOL = 2e-3
DEFAULT_STEPS = 20
ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")
SHORT = {"numpy": "numpy", "array_api_strict": "strict", "torch": "torch", "jax": "jax",
         "cupy": "cupy"}


# ------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class Config:
    """One optimizer setting: builder name, structure, estimator (None for RING), keywords."""

    optimizer: str
    structure: str
    estimator: str | None
    kwargs: tuple = ()

    @property
    def label(self) -> str:
        est = {"double_backprop": "double_bp", "finite_difference": "fin_diff", None: "-"}
        return f"{self.optimizer}/{self.structure}/{est[self.estimator]}"

    def build(self):
        import grng_core as gc

        kw = dict(self.kwargs)
        if self.estimator is not None:
            kw["gr"] = self.estimator
        return getattr(gc, self.optimizer)(structure=self.structure, **kw)


_BASE = {
    "ring": (("lr", 0.1), ("rho", 0.05), ("damping", 1e-2), ("momentum", 0.5),
             ("inverse_every", 2)),
    "reng": (("lr", 0.1), ("rho", 0.05), ("damping", 1e-2), ("momentum", 0.5),
             ("inverse_every", 2)),
    "rkalman": (("lr", 0.2), ("rho", 0.05), ("damping", 1e-2), ("inverse_every", 5)),
}


QUICK = ("ring/kfac/-", "ring/woodbury/-", "reng/diagonal/fin_diff",
         "reng/woodbury/double_bp", "rkalman/kfac/fin_diff", "rkalman/woodbury/double_bp")


def quick_configs() -> list[Config]:
    """A representative subset (every structure, estimator and optimizer once) for --quick."""
    by_label = {c.label: c for c in default_configs()}
    return [by_label[k] for k in QUICK]


def default_configs() -> list[Config]:
    """Every optimizer x structure x estimator: 3 RING + 6 RENG + 6 R-Kalman."""
    out = []
    for name in ("ring", "reng", "rkalman"):
        for structure in ("kfac", "diagonal", "woodbury"):
            kw = _BASE[name]
            if structure == "diagonal" and name != "rkalman":
                kw = tuple((k, 0.01 if k == "lr" else v) for k, v in kw)
            ests = (None,) if name == "ring" else ("double_backprop", "finite_difference")
            out.extend(Config(name, structure, e, kw) for e in ests)
    return out


# ------------------------------------------------------------------ backends
def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def available_backends() -> list[str]:
    """The installed libraries (cupy only with a usable GPU)."""
    out = []
    for name in ALL_BACKENDS:
        if name == "cupy":
            if gpu_available():
                out.append(name)
        elif importlib.util.find_spec(name) is not None:
            out.append(name)
    return out


@dataclass
class _Backend:
    name: str
    from_numpy: Any
    to_numpy: Any
    jit: Any = None  # wraps the step function (jax.jit), or None


def _backend(name: str) -> _Backend:
    from grng_core.reference import to_numpy

    if name == "numpy":
        return _Backend(name, lambda a: np.array(a, copy=True), to_numpy)
    if name == "array_api_strict":
        import array_api_strict as xps

        return _Backend(name, xps.asarray, to_numpy)
    if name == "torch":
        import torch

        return _Backend(name, lambda a: torch.from_numpy(np.array(a, copy=True)), to_numpy)
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # before any jax array is created
        import jax.numpy as jnp

        def jit(fn):
            return jax.jit(fn, static_argnames=("curvature", "inverse"))

        return _Backend(name, jnp.asarray, to_numpy, jit)
    if name == "cupy":
        import cupy

        return _Backend(name, cupy.asarray, to_numpy)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(ALL_BACKENDS)}")


# ------------------------------------------------------------------ the run
@dataclass(frozen=True)
class Problem:
    """The model and the minibatches (NumPy, in the run's dtype) every backend trains on."""

    sizes: tuple
    batches: tuple  # ((x, y), ...) one per step
    params0: tuple


def make_problem(steps: int, dtype: str = "float64", hidden: int = 16, batch_size: int = 32,
                 seed: int = 0) -> Problem:
    """Digits (sklearn) minibatches, or Gaussian blobs where sklearn is missing."""
    from grng_core.reference import MLP

    try:
        from grng_core.reference import load_digits_split

        d = load_digits_split(seed=seed)
        x_all, y_all = d.x_train, d.y_train
    except ImportError:
        rng0 = np.random.default_rng(seed + 1)
        labels = rng0.integers(0, 10, 1000)
        centers = rng0.standard_normal((10, 64))
        x_all = centers[labels] + 0.5 * rng0.standard_normal((1000, 64))
        y_all = np.eye(10)[labels]
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        idx = rng.choice(x_all.shape[0], size=batch_size, replace=False)
        batches.append((x_all[idx].astype(dtype), y_all[idx].astype(dtype)))
    sizes = (x_all.shape[1], hidden, y_all.shape[1])
    params0 = tuple(p.astype(dtype) for p in MLP(sizes).init(seed=seed))
    return Problem(sizes, tuple(batches), params0)


def train(backend: str, config: Config, problem: Problem) -> tuple[list, dict]:
    """The parameter trajectory (NumPy, after each step) and the final state's arrays."""
    import grng_core as gc
    from grng_core.checkpoint import META_KEY, state_to_numpy
    from grng_core.reference import MLP

    be = _backend(backend)
    mlp = MLP(problem.sizes, activation="tanh", loss="softmax_ce")
    opt = config.build()
    req = opt.requirements
    layers = [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]
    params = [be.from_numpy(p) for p in problem.params0]
    state = opt.init(params, layers=layers if config.structure == "kfac" else None)

    def step(params, state, x, y, curvature, inverse):
        b = mlp.batch(params, x, y, per_example=req.per_example_grads and curvature,
                      layer_stats=req.layer_stats and curvature)
        stats = gc.Stats(per_example_grads=b.per_example_grads, layers=b.layers)
        updates, state = opt.update(b.grads, state, params, stats, mlp.oracle(x, y),
                                    curvature=curvature, inverse=inverse)
        return gc.apply_updates(params, updates), state

    if be.jit is not None:
        step = be.jit(step)
    trajectory = []
    for t, (x, y) in enumerate(problem.batches):
        curvature, inverse = opt.flags(t)
        params, state = step(params, state, be.from_numpy(x), be.from_numpy(y),
                             curvature=curvature, inverse=inverse)
        trajectory.append([np.asarray(be.to_numpy(p), dtype=np.float64) for p in params])
    final = {k: np.asarray(v, dtype=np.float64) for k, v in state_to_numpy(state).items()
             if k != META_KEY}
    return trajectory, final


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    if scale == 0.0:
        return 0.0
    return float(np.linalg.norm(a - b)) / scale


def compare(run_a, run_b) -> float:
    """The largest relative difference between two runs (trajectory and final state)."""
    (traj_a, fin_a), (traj_b, fin_b) = run_a, run_b
    worst = 0.0
    for pa, pb in zip(traj_a, traj_b, strict=True):
        for a, b in zip(pa, pb, strict=True):
            worst = max(worst, _rel(a, b))
    if set(fin_a) != set(fin_b):
        return math.inf
    for k in fin_a:
        worst = max(worst, _rel(fin_a[k], fin_b[k]))
    return worst


@dataclass
class Report:
    """What a consistency run found: diffs[config label][(backend_a, backend_b)] = largest."""

    dtype: str
    steps: int
    tol: float
    backends: list
    configs: list
    diffs: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # (config label, backend) -> message
    seconds: dict = field(default_factory=dict)  # backend -> total training seconds

    @property
    def pairs(self) -> list[tuple[str, str]]:
        b = self.backends
        return [(b[i], b[j]) for i in range(len(b)) for j in range(i + 1, len(b))]

    @property
    def worst(self) -> tuple[float, str | None, tuple | None]:
        best = (0.0, None, None)
        for label, row in self.diffs.items():
            for pair, v in row.items():
                if not v <= best[0]:
                    best = (v, label, pair)
        return best

    @property
    def passed(self) -> bool:
        return not self.errors and all(v <= self.tol for row in self.diffs.values()
                                       for v in row.values())

    def table(self) -> str:
        pairs = self.pairs
        heads = [f"{SHORT[a]}|{SHORT[b]}" for a, b in pairs]
        w0 = max([len("configuration")] + [len(c.label) for c in self.configs])
        widths = [max(9, len(h)) for h in heads]
        lines = ["  ".join(["configuration".ljust(w0)] + [h.rjust(w) for h, w in
                                                          zip(heads, widths)])]
        lines.append("-" * len(lines[0]))
        col_max = [0.0] * len(pairs)
        for c in self.configs:
            row = self.diffs.get(c.label, {})
            cells = []
            for i, (p, w) in enumerate(zip(pairs, widths)):
                v = row.get(p, math.inf)
                col_max[i] = v if not v <= col_max[i] else col_max[i]
                cells.append(_fmt(v).rjust(w))
            lines.append("  ".join([c.label.ljust(w0)] + cells))
        lines.append("-" * len(lines[0]))
        lines.append("  ".join(["max".ljust(w0)] + [_fmt(v).rjust(w) for v, w in
                                                   zip(col_max, widths)]))
        return "\n".join(lines)

    def summary(self) -> str:
        v, label, pair = self.worst
        where = f" ({label}, {pair[0]} vs {pair[1]})" if label else ""
        verdict = "OK" if self.passed else "FAILED"
        out = [f"largest relative difference {_fmt(v)}{where}; tolerance {self.tol:g} "
               f"({self.dtype}): {verdict}"]
        for (label, backend), msg in self.errors.items():
            out.append(f"error: {label} on {backend}: {msg}")
        return "\n".join(out)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "inf"
    if math.isnan(v):
        return "nan"
    return f"{v:.1e}"


def default_tol(dtype: str) -> float:
    return FLOAT64_TOL if dtype == "float64" else FLOAT32_TOL


def run(backends: Sequence[str] | None = None, configs: Sequence[Config] | None = None,
        steps: int = DEFAULT_STEPS, dtype: str = "float64", tol: float | None = None,
        hidden: int = 16, batch_size: int = 32, seed: int = 0, progress=None) -> Report:
    """Train every configuration on every backend and compare all pairs (in-process).

    backends: default every installed one (`available_backends()`); configs: default
    `default_configs()`. progress: optional callable(str) told about each run.
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    backends = list(available_backends() if backends is None else backends)
    for b in backends:
        if b not in ALL_BACKENDS:
            raise ValueError(f"unknown backend {b!r}; known: {', '.join(ALL_BACKENDS)}")
    configs = list(default_configs() if configs is None else configs)
    report = Report(dtype, steps, default_tol(dtype) if tol is None else tol, backends, configs)
    problem = make_problem(steps, dtype, hidden, batch_size, seed)
    for c in configs:
        runs = {}
        for b in backends:
            t0 = time.perf_counter()
            try:
                runs[b] = train(b, c, problem)
            except Exception as e:  # reported in the table as inf and in the summary
                report.errors[(c.label, b)] = f"{type(e).__name__}: {e}"
            report.seconds[b] = report.seconds.get(b, 0.0) + time.perf_counter() - t0
            if progress is not None:
                progress(f"{c.label} on {b}: {time.perf_counter() - t0:.1f}s")
        report.diffs[c.label] = {
            (a, b): compare(runs[a], runs[b]) if a in runs and b in runs else math.inf
            for a, b in report.pairs}
    return report


# ------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m grng_core.consistency",
        description="Train the reference MLP with every optimizer on every installed array "
                    "backend and print the largest relative difference per backend pair; "
                    "exit status 1 above the tolerance.")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps (default {DEFAULT_STEPS}, 5 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="a fast check: 6 representative configurations (every optimizer, "
                         "structure and estimator at least once), 5 steps, hidden width 8, "
                         "batch 16")
    ap.add_argument("--backends", default=None,
                    help="comma-separated subset of: " + ", ".join(ALL_BACKENDS)
                         + " (default: every installed one; cupy needs a GPU)")
    ap.add_argument("--optimizers", default=None,
                    help="comma-separated subset of ring, reng, rkalman (default: all)")
    ap.add_argument("--tol", type=float, default=None,
                    help=f"tolerance (default {FLOAT64_TOL:g} in float64, {FLOAT32_TOL:g} in "
                         "float32)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true", help="print each run's time")
    args = ap.parse_args(argv)

    steps = args.steps if args.steps is not None else (5 if args.quick else DEFAULT_STEPS)
    hidden = args.hidden if args.hidden is not None else (8 if args.quick else 16)
    batch = args.batch_size if args.batch_size is not None else (16 if args.quick else 32)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in ALL_BACKENDS]
        if unknown:
            ap.error(f"unknown backends {unknown}; known: {', '.join(ALL_BACKENDS)}")
        if "cupy" in backends and not gpu_available():
            ap.error("backend cupy needs CuPy and a CUDA GPU")
    else:
        backends = available_backends()
    configs = quick_configs() if args.quick else default_configs()
    if args.optimizers:
        wanted = {o.strip() for o in args.optimizers.split(",") if o.strip()}
        bad = wanted - {"ring", "reng", "rkalman"}
        if bad:
            ap.error(f"unknown optimizers {sorted(bad)}")
        configs = [c for c in configs if c.optimizer in wanted]
    if steps < 1:
        ap.error("--steps must be >= 1")
    if len(backends) < 2:
        print(f"only {backends or 'no backend'} installed: nothing to compare")
        return 0
    progress = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None
    t0 = time.perf_counter()
    report = run(backends, configs, steps, args.dtype, args.tol, hidden, batch, args.seed,
                 progress)
    print(f"grng_core.consistency: {len(configs)} configurations x {len(backends)} backends, "
          f"{steps} steps, {args.dtype}, MLP {(64, hidden, 10)} batch {batch}, "
          f"{time.perf_counter() - t0:.0f}s")
    print(report.table())
    print(report.summary())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
