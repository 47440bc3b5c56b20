"""Training loop and measurements of one run (:func:`run_one`).

Measured per run (see the report's "Method" section, written by :mod:`benchmarks.report`):

- training loss (mean of the minibatch losses since the previous evaluation) and the validation
  and test metric, ``task.evals_per_epoch`` times per epoch; evaluation time is not counted;
- every step's minibatch gradient norm ||g|| (global L2 norm of the step's training-batch
  gradient at the parameters the step starts from, recorded by the stepper; torch: the time
  spent measuring it is left out of the step time) and its mean over training;
- wall-clock training time to the task's target test metric (first evaluation at or past it);
- mean step time (steps after the first two), and its split: one plain forward+backward of the
  model at that batch size (the reference: median of repeated plain forward+backward passes
  with no optimizer attached, measured right before each run, :mod:`benchmarks.fb_reference`),
  and the optimizer's overhead = step time - reference (extra passes, curvature, inverses, the
  update, hooks);
- peak memory: the rise of the process's peak resident set size during the run (Linux
  ``/proc/self/clear_refs``; ``nan`` elsewhere);
- the norm of the full training-set gradient at the final parameters.

The suite of runs (sweep, selection, seeds) is :mod:`benchmarks.suite`.
"""

from __future__ import annotations

import math
import os
import time
import traceback

import numpy as np

from benchmarks.fb_reference import reference_fb_time
from benchmarks.frameworks import TorchView, jax_arrays, torch_arrays
from benchmarks.peak_memory import PeakRSS
from benchmarks.run_result import RunResult

WARMUP_STEPS = 2  # steps left out of the mean step time


def run_one(task, spec, hp: dict, seed: int, epochs: int, fb_time: float | None = None,
            progress=None, mem: PeakRSS | None = None) -> RunResult:
    """Train ``spec``'s optimizer with ``hp`` on ``task`` for ``epochs`` epochs from ``seed``.

    fb_time: the reference forward+backward; None measures it now (the suite does).
    """
    if fb_time is None:
        try:
            fb_time = reference_fb_time(task, spec.framework)
        except Exception:
            fb_time = math.nan
    res = RunResult(task.name, spec.key, spec.label_for(task), dict(hp), seed, fb_time=fb_time)
    mem = mem or PeakRSS()
    conv = jax_arrays if spec.framework == "jax" else torch_arrays
    stepper = _build(task, spec, hp, seed, res)
    if stepper is None:
        if progress is not None:
            progress.update(epochs * task.n_steps_per_epoch())
        return res
    view = stepper if spec.framework == "jax" else TorchView(stepper, task)
    evaluate = _Evaluator(task, view, conv, res)
    evaluate(0, 0.0, [])
    mem.reset()
    times, counted = _train(task, stepper, conv, evaluate, res, epochs, seed, progress)
    res.peak_mem_mb = mem.rise()
    if progress is not None:  # top up whatever a diverged/failed run left
        progress.update(max(0, epochs * task.n_steps_per_epoch() - counted))
    _finish(task, view, conv, res, times)
    return res


def _build(task, spec, hp: dict, seed: int, res: RunResult):
    """The run's stepper on a fresh model; None (and ``res.status`` says why) if it fails."""
    try:
        import torch

        torch.manual_seed(seed)
        model = task.make_model(seed)
        return spec.build(model, task, hp, seed)
    except Exception as e:
        _fail(res, e)
        return None


class _Evaluator:
    """Validation and test metric of the model now, appended to the run's history."""

    def __init__(self, task, view, conv, res: RunResult):
        self.task, self.view, self.res = task, view, res
        self.evals = {w: conv(*task.eval_set(w), task) for w in ("valid", "test")}

    def __call__(self, step, epoch_float, losses, gnorms=()) -> dict:
        task, res = self.task, self.res
        point = {"step": step, "epoch": epoch_float, "time": res.train_time,
                 "loss": float(np.mean(losses)) if losses else math.nan,
                 "gnorm": _finite_mean(gnorms)}
        for w, (x, y) in self.evals.items():
            point[w] = task.metric_from_logits(self.view.logits(x), np.asarray(y))
        res.history.append(point)
        if math.isnan(res.time_to_target) and task.reached(point["test"]):
            res.time_to_target, res.steps_to_target = res.train_time, step
        return point


def _train(task, stepper, conv, evaluate, res: RunResult, epochs: int, seed: int, progress):
    """The timed training steps, evaluating ``task.evals_per_epoch`` times per epoch; stops at
    a non-finite loss ("diverged") or an exception ("error: ...").

    Returns (seconds of every step, steps reported to ``progress`` so far).
    """
    rng = np.random.default_rng(seed)
    spe = task.n_steps_per_epoch()
    eval_at = {int(round(spe * (k + 1) / task.evals_per_epoch)) for k in
               range(task.evals_per_epoch)}
    times: list[float] = []
    counted = 0
    try:
        for ep in range(epochs):
            batches = [conv(x, y, task) for x, y in task.epoch_batches(rng)]
            losses: list[float] = []
            for i, (x, y) in enumerate(batches, start=1):
                stepper.step_grad_norm, stepper.probe_s = math.nan, 0.0
                t0 = time.perf_counter()
                loss = stepper.step(x, y)
                dt = time.perf_counter() - t0 - stepper.probe_s
                res.train_time += dt
                res.steps += 1
                times.append(dt)
                losses.append(loss)
                res.grad_norms.append(float(stepper.step_grad_norm))
                if not math.isfinite(loss):
                    res.status = "diverged"
                    break
                if i in eval_at:
                    n = len(losses)
                    evaluate(res.steps, ep + i / spe, losses, res.grad_norms[-n:])
                    losses = []
                    if progress is not None:
                        progress.update(res.steps - counted)
                        counted = res.steps
            if res.status != "ok":
                break
    except Exception as e:
        _fail(res, e)
    return times, counted


def _finish(task, view, conv, res: RunResult, times: list[float]) -> None:
    """Mean step time, the final and selecting metrics, and the final gradient norm."""
    timed = times[WARMUP_STEPS:] or times
    res.step_time = float(np.mean(timed)) if timed else math.nan
    res.mean_grad_norm = _finite_mean(res.grad_norms)
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
        except Exception as e:
            res.status = "error: grad norm: " + _short(e)
    if res.status == "diverged":
        res.final_valid = res.final_test = res.select_valid = math.nan


def _finite_mean(values) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _fail(res: RunResult, e: BaseException) -> None:
    res.status = "error: " + _short(e)
    if os.environ.get("GRNG_BENCH_DEBUG"):
        traceback.print_exc()


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}"
