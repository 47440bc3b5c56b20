"""``RunResult``: the measurements of one training run (one task, optimizer, setting, seed),
as the harness fills them in and the report reads them (also the records of results.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class RunResult:
    task: str
    opt: str
    label: str
    hp: dict
    seed: int
    status: str = "ok"  # "ok", "diverged", or "error: ..."
    history: list = field(default_factory=list)  # dicts: step, epoch, time, loss, gnorm,
    # valid, test (loss and gnorm: means over the steps since the previous evaluation)
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
    grad_norm: float = math.nan  # full training-set gradient norm at the end
    grad_norms: list = field(default_factory=list)  # every step's minibatch gradient norm
    mean_grad_norm: float = math.nan  # their mean over training (the finite ones)
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


def group_runs(runs: list[RunResult]) -> dict:
    """(task, opt) -> runs, in first-seen order."""
    out: dict = {}
    for r in runs:
        out.setdefault((r.task, r.opt), []).append(r)
    return out
