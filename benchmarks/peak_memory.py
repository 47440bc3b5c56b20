"""Peak memory of a run: the rise of the process's peak resident set size (Linux)."""

from __future__ import annotations

import math
import os


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
