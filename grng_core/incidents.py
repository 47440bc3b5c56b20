"""What a step did locally to stay finite, kept on the host for reports (`describe`).

A K-FAC factor that is not numerically positive definite on the host (the damping below the
dtype's precision) is inverted with extra damping τ (`linalg.RESCUE_SHIFTS`·tr/d, the first
that factorises) instead of ending the run; `Incidents` counts that per factor, keeps the last
τ, and warns once per factor naming it. Under jit the failed factorisation gives NaN and the
step is skipped and counted in the state (`OptState.skipped`) instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


class FactorIncident(NamedTuple):
    """layer: its name; factor: "A" or "S"; refreshes: inversions that needed extra damping;
    extra_damping: the last τ added."""

    layer: str
    factor: str
    refreshes: int
    extra_damping: float


@dataclass
class Incidents:
    """Per-factor extra-damping log. name_of(weight position) -> the layer's name (adapters
    give module paths); the default is the params container's key."""

    name_of: Callable[[int], str] | None = None
    log: dict[tuple[int, str], list] = field(default_factory=dict)

    def rescue(self, position: int, factor: str, key) -> Callable[[float], None]:
        """The callable `linalg.cholesky_inverse` reports τ to, for one factor."""

        def record(tau: float) -> None:
            name = self.name_of(position) if self.name_of else repr(key)
            entry = self.log.setdefault((position, factor), [name, 0, 0.0])
            entry[1] += 1
            entry[2] = tau
            if entry[1] == 1:
                warnings.warn(
                    f"K-FAC factor {factor} of layer {name} was not numerically positive "
                    f"definite: inverted with extra damping {tau:.3g} (counted; "
                    "opt.describe() lists every such factor). Raise damping or use "
                    "state_dtype='float64' if it recurs.", RuntimeWarning, stacklevel=2)

        return record

    def entries(self) -> tuple[FactorIncident, ...]:
        return tuple(FactorIncident(name, factor, count, tau)
                     for (_, factor), (name, count, tau) in sorted(self.log.items()))
