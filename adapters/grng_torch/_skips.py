"""Skipped non-finite steps on accelerators, reported one step later without a stall.

On CPU tensors the core warns at once (reading a CPU tensor is free). On a GPU the core
where-selects the skip in-graph and reads nothing (ALGORITHMS.md §4; a per-step host read
would stall the pipeline): after each step the group's skip counter is copied to the host
asynchronously and an event recorded; at the next step, once the event has completed, new
skips are reported through `grng_core.guard.report` (a warning, or FloatingPointError for
on_nonfinite="raise" — which the core already raises at once, as it reads its verdict).
`opt.check_nonfinite()` waits for the copies and reports now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from grng_core.guard import report


@dataclass
class _Pending:
    group: int
    seen: int  # skips already reported for this group
    host: torch.Tensor  # the counter, being copied to the host
    event: Any  # torch.cuda.Event recorded after the copy


class SkipMonitor:
    """Per-optimizer bookkeeping of reported skips (CUDA groups only)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.pending: list[_Pending] = []

    def after_step(self, group: int, skipped: torch.Tensor) -> None:
        """Start the asynchronous copy of a group's counter (no-op for CPU tensors)."""
        if skipped.device.type != "cuda":
            return
        host = skipped.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append(_Pending(group, self.seen.get(group, 0), host, event))

    def poll(self, on_nonfinite: str = "skip", wait: bool = False) -> None:
        """Report the copies that have landed (all of them with `wait`)."""
        keep = []
        for p in self.pending:
            if not (wait or p.event.query()):
                keep.append(p)
                continue
            p.event.synchronize()
            now = int(p.host)
            new = now - max(p.seen, self.seen.get(p.group, 0))
            self.seen[p.group] = max(now, self.seen.get(p.group, 0))
            report(new, on_nonfinite, where=f" in param group {p.group}")
        self.pending = keep
