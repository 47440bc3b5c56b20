"""The consistency table: per configuration, the largest difference per backend pair."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from grng_core.consistency.backends import ALL_BACKENDS, available_backends
from grng_core.consistency.cases import Config, default_configs
from grng_core.consistency.runs import compare, make_problem, train

FLOAT64_TOL = 1e-10
FLOAT32_TOL = 2e-3
DEFAULT_STEPS = 20
SHORT = {"numpy": "numpy", "array_api_strict": "strict", "torch": "torch", "jax": "jax",
         "cupy": "cupy"}


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
        where = f" ({label}, {pair[0]} vs {pair[1]})" if label and pair else ""
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
