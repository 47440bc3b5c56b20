"""The reference of the step-time split: one plain forward+backward of a task's model at its
batch size, with no optimizer attached (a jitted ``value_and_grad`` for the JAX rows)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.frameworks import jax_arrays, torch_arrays
from benchmarks.losses import jax_xent, task_loss

_JIT_CACHE: dict = {}


def reference_fb_time(task, framework: str = "torch", budget: float = 0.3,
                      max_reps: int = 30) -> float:
    """Median seconds of one plain forward+backward at the task's batch size (no optimizer).

    Repeated until ``budget`` seconds or ``max_reps`` (at least 5 times); measured right before
    each run, so that it shares the run's machine conditions.
    """
    rng = np.random.default_rng(0)
    x, y = next(task.epoch_batches(rng))
    once = _jax_fb(task, x, y) if framework == "jax" else _torch_fb(task, x, y)
    once()
    once()
    times: list[float] = []
    t_end = time.perf_counter() + budget
    while len(times) < 5 or (len(times) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _jax_fb(task, x, y):
    """One jitted value_and_grad of the JAX twin on the batch (compiled once per task shape)."""
    import jax

    from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax

    params = torch_mlp_to_jax(task.make_model(0))
    act = task.activation
    key = ("jax_fb", task.name, task.batch_size)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(jax.value_and_grad(
            lambda p, a, b: jax_xent(jax_mlp_apply(p, a, act), b)))
    vg = _JIT_CACHE[key]
    xa, ya = jax_arrays(x, y, task)

    def once():
        jax.block_until_ready(vg(params, xa, ya))

    return once


def _torch_fb(task, x, y):
    """One plain forward+backward of the task's torch model on the batch."""
    model = task.make_model(0)
    lf = task_loss(task)
    xt, yt = torch_arrays(x, y, task)

    def once():
        model.zero_grad(set_to_none=True)
        lf(model(xt), yt).backward()

    return once
