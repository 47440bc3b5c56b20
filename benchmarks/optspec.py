"""``OptSpec``: one optimizer row of the suite (label, framework, base hyperparameters, the
builder of its stepper, the packages it needs) and its hyperparameter sweep."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.hyperparams import SWEEPS


@dataclass
class OptSpec:
    key: str  # unique row key, e.g. "ring"
    label: str  # table label, e.g. "RING (kfac)"
    framework: str  # "torch" or "jax"
    group: str  # "grng", "baseline" or "peer"
    base: dict  # base hyperparameters; "lr" and "damping" are swept
    build: Callable  # (model, task, hp, seed) -> stepper  (torch); jax: see jax_runs
    requires: tuple = ()  # importable modules needed
    full_only: bool = False
    tasks: tuple | None = None  # None = every task
    note: str = ""
    extra: dict = field(default_factory=dict)
    valid: Callable | None = None  # hp -> bool: settings of the sweep the optimizer allows
    fixed: bool = False  # run ``base`` as it is, no sweep (the GRNG rows at their defaults)

    def label_for(self, task) -> str:
        """The row label; a GRNG row names its structure (``extra["structure"]`` or the
        task's), its variant and its RING form, e.g. "RING (kfac, gauss_newton)"."""
        algo = self.extra.get("algo")
        if algo and "structure" not in self.base:
            parts = [self.extra.get("structure") or task.structures[algo],
                     self.extra.get("variant"), self.base.get("form")]
            return f"{self.label} ({', '.join(p for p in parts if p)})"
        return self.label

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def sweep_grid(self, preset: str, task=None) -> list[dict]:
        """Hyperparameter settings of the sweep: base values times the grid's multipliers
        (a task may narrow the grid: ``Task.sweep``, e.g. the char LM's damping); settings
        that ``valid`` rejects are left out (RING gauss_newton: rho * damping <= 1). A
        ``fixed`` row has one setting, its base."""
        if self.fixed:
            return [dict(self.base)]
        grid = dict(SWEEPS[preset])
        if task is not None and task.sweep:
            grid.update(task.sweep)
        out = []
        for lm in grid["lr"]:
            dms = grid["damping"] if "damping" in self.base else (None,)
            for dm in dms:
                hp = dict(self.base)
                hp["lr"] = _round(self.base["lr"] * lm)
                if dm is not None:
                    hp["damping"] = _round(self.base["damping"] * dm)
                if self.valid is None or self.valid(hp):
                    out.append(hp)
        return out


def _round(x: float) -> float:
    return float(f"{x:.3g}")
