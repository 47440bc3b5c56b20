"""The machine and software a run happened on (for the reports), and the peers' known,
harmless warnings silenced; shared by the suite and the step-cost microbenchmark."""

from __future__ import annotations

import os
import platform


def environment(threads: int | None = None) -> dict:
    """Python, CPU, torch (and its thread count, set to ``threads`` if given), the load
    average and the versions of the optional peers."""
    import importlib.metadata as md

    import torch

    if threads:
        torch.set_num_threads(threads)
    env = {"python": platform.python_version(), "machine": _cpu_name(),
           "cores": os.cpu_count(), "torch": torch.__version__,
           "torch threads": torch.get_num_threads(), "load average at start": load_average()}
    for dist in ("jax", "optax", "asdfghjkl", "pytorch-optimizer", "ivon-opt", "heavyball",
                 "kfac-jax", "numpy", "scikit-learn"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = "not installed"
    return env


def load_average() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews the timings)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quiet_peer_warnings() -> None:
    """Silence two known, harmless warnings the peers trigger on every step (ASDL's module
    backward hooks; SophiaH's backward(create_graph=True), whose cycle the stepper breaks)."""
    import warnings

    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
