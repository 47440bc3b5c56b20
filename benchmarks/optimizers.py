"""The optimizer rows of the suite, in the order of the tables: GRNG through ``grng_torch``
(:mod:`benchmarks.grng_runs`), the torch baselines and peers (:mod:`benchmarks.torch_runs`) and
the JAX rows (:mod:`benchmarks.jax_runs`: ``optax.adamw``, ``kfac-jax``, ``grng_jax``).

A row is an :class:`benchmarks.optspec.OptSpec`; its builder returns a *stepper* that owns the
model's optimizer and does one training step on a batch: ``stepper.step(x, y) -> float`` (the
batch loss before the update). The harness times it.
"""

from __future__ import annotations

from benchmarks import grng_runs, jax_runs, torch_runs
from benchmarks.optspec import OptSpec


def all_specs() -> list[OptSpec]:
    """Every optimizer row, GRNG first (the order of the tables)."""
    return grng_runs.specs() + torch_runs.specs() + jax_runs.specs()


def select_specs(preset: str, names: list[str] | None = None) -> list[OptSpec]:
    specs = all_specs()
    if names:
        known = {s.key for s in specs}
        bad = [n for n in names if n not in known]
        if bad:
            raise SystemExit(f"unknown optimizer(s) {bad}; known: {', '.join(sorted(known))}")
        return [s for s in specs if s.key in names]
    return [s for s in specs if preset == "full" or not s.full_only]
