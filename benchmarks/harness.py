"""Training loop and measurements of one run, and the suite (tasks x optimizers x seeds).

Measured per run (see the report's "Method" section, written by :mod:`benchmarks.report`):

- training loss (mean of the minibatch losses since the previous evaluation) and the validation
  and test metric, ``task.evals_per_epoch`` times per epoch; evaluation time is not counted;
- wall-clock training time to the task's target test metric (first evaluation at or past it);
- mean step time (steps after the first two), and its split: one plain forward+backward of the
  model at that batch size (the reference: median of repeated plain forward+backward passes
  with no optimizer attached, measured right before each run), and the optimizer's overhead =
  step time - reference (extra passes, curvature, inverses, the update, hooks);
- peak memory: the rise of the process's peak resident set size during the run (Linux
  ``/proc/self/clear_refs``; ``nan`` elsewhere);
- the norm of the full training-set gradient at the final parameters.

Hyperparameters: every optimizer's sweep (``OptSpec.sweep_grid``) runs on seed 0; the setting with
the best *validation* metric (mean over the last epoch's evaluations) is then run on every seed.
The test metric is never used to choose.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

WARMUP_STEPS = 2  # steps left out of the mean step time


@dataclass
class RunResult:
    task: str
    opt: str
    label: str
    hp: dict
    seed: int
    status: str = "ok"  # "ok", "diverged", or "error: ..."
    history: list = field(default_factory=list)  # dicts: step, epoch, time, loss, valid, test
    steps: int = 0
    train_time: float = 0.0
    step_time: float = math.nan  # mean seconds per step
    fb_time: float = math.nan  # reference forward+backward, seconds
    time_to_target: float = math.nan  # seconds of training, nan when not reached
    steps_to_target: float = math.nan
    final_loss: float = math.nan
    final_valid: float = math.nan
    final_test: float = math.nan
    select_valid: float = math.nan  # mean validation metric over the last epoch: selects
    grad_norm: float = math.nan
    peak_mem_mb: float = math.nan
    sweep: bool = False  # a sweep run (seed 0) - kept in the report's sweep table

    @property
    def opt_time(self) -> float:
        return self.step_time - self.fb_time

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> RunResult:
        return RunResult(**d)


# ---------------------------------------------------------------------------------------------
# memory


class PeakRSS:
    """Peak resident set size of this process since `reset()` (Linux), in MiB."""

    def __init__(self):
        self.ok = os.path.exists("/proc/self/clear_refs")
        self.base = 0.0

    @staticmethod
    def _read(field_name: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1]) / 1024.0
        return math.nan

    def reset(self):
        if not self.ok:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.ok = False
            return
        self.base = self._read("VmRSS")

    def rise(self) -> float:
        if not self.ok:
            return math.nan
        return max(0.0, self._read("VmHWM") - self.base)


# ---------------------------------------------------------------------------------------------
# framework glue


def _torch_arrays(x, y, task):
    import torch

    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    return xt, yt


def _jax_arrays(x, y, task):
    import jax.numpy as jnp

    return jnp.asarray(x), jnp.asarray(y)


class _TorchView:
    """Evaluation and gradient norm of a torch stepper's model."""

    def __init__(self, stepper, task):
        self.stepper, self.task = stepper, task

    def logits(self, x):
        import torch

        with torch.no_grad():
            return self.stepper.model(x).numpy()

    def grad_norm(self, x, y):
        import torch

        from benchmarks.optimizers import task_loss

        model = self.stepper.model
        params = [p for p in model.parameters() if p.requires_grad]
        loss = task_loss(self.task)(model(x), y)
        grads = torch.autograd.grad(loss, params)
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def reference_fb_time(task, framework: str = "torch", budget: float = 0.3,
                      max_reps: int = 30) -> float:
    """Median seconds of one plain forward+backward at the task's batch size (no optimizer).

    Repeated until ``budget`` seconds or ``max_reps`` (at least 5 times); measured right before
    each run, so that it shares the run's machine conditions.
    """
    rng = np.random.default_rng(0)
    x, y = next(task.epoch_batches(rng))
    if framework == "jax":
        import jax

        from benchmarks.jax_runs import _xent
        from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax

        params = torch_mlp_to_jax(task.make_model(0))
        act = task.activation
        key = ("jax_fb", task.name, task.batch_size)
        if key not in _JIT_CACHE:
            _JIT_CACHE[key] = jax.jit(jax.value_and_grad(
                lambda p, a, b: _xent(jax_mlp_apply(p, a, act), b)))
        vg = _JIT_CACHE[key]
        xa, ya = _jax_arrays(x, y, task)

        def once():
            jax.block_until_ready(vg(params, xa, ya))
    else:
        from benchmarks.optimizers import task_loss

        model = task.make_model(0)
        lf = task_loss(task)
        xt, yt = _torch_arrays(x, y, task)

        def once():
            model.zero_grad(set_to_none=True)
            lf(model(xt), yt).backward()

    once()
    once()
    times: list[float] = []
    t_end = time.perf_counter() + budget
    while len(times) < 5 or (len(times) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_JIT_CACHE: dict = {}


# ---------------------------------------------------------------------------------------------
# one run


def run_one(task, spec, hp: dict, seed: int, epochs: int, fb_time: float | None = None,
            progress=None, mem: PeakRSS | None = None) -> RunResult:
    """Train ``spec``'s optimizer with ``hp`` on ``task`` for ``epochs`` epochs from ``seed``.

    fb_time: the reference forward+backward; None measures it now (the suite does).
    """
    if fb_time is None:
        try:
            fb_time = reference_fb_time(task, spec.framework)
        except Exception:  # noqa: BLE001 - e.g. JAX missing: the build below reports it
            fb_time = math.nan
    res = RunResult(task.name, spec.key, spec.label_for(task), dict(hp), seed, fb_time=fb_time)
    mem = mem or PeakRSS()
    conv = _jax_arrays if spec.framework == "jax" else _torch_arrays
    try:
        import torch

        torch.manual_seed(seed)
        model = task.make_model(seed)
        stepper = spec.build(model, task, hp, seed)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        res.status = "error: " + _short(e)
        if os.environ.get("GRNG_BENCH_DEBUG"):
            traceback.print_exc()
        if progress is not None:
            progress.update(epochs * task.n_steps_per_epoch())
        return res
    view = stepper if spec.framework == "jax" else _TorchView(stepper, task)
    evals = {w: conv(*task.eval_set(w), task) for w in ("valid", "test")}
    rng = np.random.default_rng(seed)
    spe = task.n_steps_per_epoch()
    eval_at = {int(round(spe * (k + 1) / task.evals_per_epoch)) for k in
               range(task.evals_per_epoch)}

    def evaluate(step, epoch_float, losses):
        point = {"step": step, "epoch": epoch_float, "time": res.train_time,
                 "loss": float(np.mean(losses)) if losses else math.nan}
        for w, (x, y) in evals.items():
            point[w] = task.metric_from_logits(view.logits(x), np.asarray(y))
        res.history.append(point)
        if math.isnan(res.time_to_target) and task.reached(point["test"]):
            res.time_to_target, res.steps_to_target = res.train_time, step
        return point

    evaluate(0, 0.0, [])
    times: list[float] = []
    counted = 0
    mem.reset()
    try:
        for ep in range(epochs):
            batches = [conv(x, y, task) for x, y in task.epoch_batches(rng)]
            losses: list[float] = []
            for i, (x, y) in enumerate(batches, start=1):
                t0 = time.perf_counter()
                loss = stepper.step(x, y)
                dt = time.perf_counter() - t0
                res.train_time += dt
                res.steps += 1
                times.append(dt)
                losses.append(loss)
                if not math.isfinite(loss):
                    res.status = "diverged"
                    break
                if i in eval_at:
                    evaluate(res.steps, ep + i / spe, losses)
                    losses = []
                    if progress is not None:
                        progress.update(res.steps - counted)
                        counted = res.steps
            if res.status != "ok":
                break
    except Exception as e:  # noqa: BLE001
        res.status = "error: " + _short(e)
        if os.environ.get("GRNG_BENCH_DEBUG"):
            traceback.print_exc()
    res.peak_mem_mb = mem.rise()
    if progress is not None:  # top up whatever a diverged/failed run left
        progress.update(max(0, epochs * spe - counted))
    timed = times[WARMUP_STEPS:] or times
    res.step_time = float(np.mean(timed)) if timed else math.nan
    if res.history:
        last = res.history[-1]
        res.final_loss = last["loss"]
        res.final_valid, res.final_test = last["valid"], last["test"]
        tail = [h["valid"] for h in res.history[1:][-task.evals_per_epoch:]]
        res.select_valid = float(np.mean(tail)) if tail else math.nan
    if res.status == "ok":
        try:
            x, y = conv(*task.grad_norm_set(), task)
            res.grad_norm = view.grad_norm(x, y)
        except Exception as e:  # noqa: BLE001
            res.status = "error: grad norm: " + _short(e)
    if res.status == "diverged":
        res.final_valid = res.final_test = res.select_valid = math.nan
    return res


def _versions(modules) -> str:
    """'pkg x.y, ...' of the distributions behind the modules (for error messages)."""
    import importlib.metadata as md

    dists = {"asdl": "asdfghjkl", "pytorch_optimizer": "pytorch-optimizer", "ivon": "ivon-opt",
             "kfac_jax": "kfac-jax", "grng_torch": "grng", "grng_core": "grng",
             "grng_jax": "grng"}
    out = []
    for m in modules:
        name = dists.get(m, m)
        try:
            v = md.version(name)
        except md.PackageNotFoundError:
            v = "?"
        if f"{name} {v}" not in out:
            out.append(f"{name} {v}")
    return ", ".join(out)


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}"


# ---------------------------------------------------------------------------------------------
# the suite


class _NoBar:
    """Stands in for tqdm where it is not installed (the test extra lacks it)."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def close(self):
        pass


def progress_bar(total: int, unit: str, disable: bool = False):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit=unit, disable=disable, dynamic_ncols=True, mininterval=0.5)


def best_of(task, runs: list[RunResult]) -> RunResult | None:
    """The sweep run with the best validation metric averaged over its last epoch's
    evaluations (ties: lower final train loss)."""
    ok = [r for r in runs if r.status == "ok" and math.isfinite(r.select_valid)]
    if not ok:
        return None
    sign = -1.0 if task.higher_is_better else 1.0
    return min(ok, key=lambda r: (sign * r.select_valid, r.final_loss))


def steps_for(task, spec, preset, seeds) -> int:
    return (len(spec.sweep_grid(preset, task)) + max(0, seeds - 1)) * task.epochs * \
        task.n_steps_per_epoch()


def run_suite(tasks, specs, preset: str, seeds: int, log=print, progress=True):
    """All runs; returns (results: list[RunResult], info: dict)."""
    info = {"unavailable": {}, "preset": preset, "seeds": seeds, "selected": {}}
    plan = [(t, s) for t in tasks for s in specs if s.tasks is None or t.name in s.tasks]
    total = sum(steps_for(t, s, preset, seeds) for t, s in plan)
    bar = progress_bar(total=total, unit="step", disable=not progress)
    mem = PeakRSS()
    results: list[RunResult] = []
    for task in tasks:
        chosen = []
        for spec in specs:
            if spec.tasks is not None and task.name not in spec.tasks:
                continue
            n_steps = steps_for(task, spec, preset, seeds)
            missing = spec.missing()
            if missing:
                info["unavailable"][f"{task.name}/{spec.key}"] = (
                    f"not installed: {', '.join(missing)}")
                bar.update(n_steps)
                continue
            bar.set_postfix_str(f"{task.name} {spec.key}", refresh=False)
            grid = spec.sweep_grid(preset, task)
            sweep: list[RunResult] = []
            failed = None
            for hp in grid:
                r = run_one(task, spec, hp, 0, task.epochs, progress=bar, mem=mem)
                r.sweep = True
                sweep.append(r)
                if r.status.startswith("error") and r.steps == 0:
                    failed = r.status
                    break
            results.extend(sweep)
            if failed:
                info["unavailable"][f"{task.name}/{spec.key}"] = (
                    f"not runnable ({_versions(spec.requires)}): {failed}")
                bar.update(max(0, n_steps - task.epochs * task.n_steps_per_epoch()))
                continue
            best = best_of(task, sweep)
            if best is None:
                bar.update(max(0, seeds - 1) * task.epochs * task.n_steps_per_epoch())
                info["selected"][f"{task.name}/{spec.key}"] = None
                continue
            info["selected"][f"{task.name}/{spec.key}"] = best.hp
            chosen.append((spec, best.hp))
        # the other seeds round-robin over the optimizers (seed-major), so that a burst of
        # other work on a shared machine does not land on one optimizer's runs only
        for seed in range(1, seeds):
            for spec, hp in chosen:
                bar.set_postfix_str(f"{task.name} seed {seed} {spec.key}", refresh=False)
                results.append(run_one(task, spec, hp, seed, task.epochs, progress=bar,
                                       mem=mem))
    bar.close()
    return results, info


def final_runs(results: list[RunResult], info: dict) -> list[RunResult]:
    """The runs of the selected setting of each (task, optimizer): the seed-0 sweep run with
    that setting plus the other seeds."""
    out = []
    for r in results:
        sel = info["selected"].get(f"{r.task}/{r.opt}")
        if sel is None:
            continue
        if r.hp == sel and (not r.sweep or r.seed == 0):
            out.append(r)
    return out
