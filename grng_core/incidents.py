"""What a step did locally to stay finite, kept on the host for reports (`describe`).

- "extra damping": a K-FAC factor that is not numerically positive definite on the host (the
  damping below the dtype's precision) is inverted with extra damping τ
  (`linalg.RESCUE_SHIFTS`·tr/d, the first that factorises) instead of ending the run;
- "belief refreshed": an R-Kalman Kronecker belief that rounding made indefinite (its RLS
  innovation system does not factorise) is refreshed from its carried damped factor.

`Incidents` counts each per (layer, factor, kind), keeps the last τ, and warns once per factor
naming it. Under jit a failed factorisation gives NaN and the step is skipped and counted in
the state (`OptState.skipped`) instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from grng_core.user_frame import user_stacklevel

_WHAT = {
    "extra damping": "was not numerically positive definite: inverted with extra damping",
    "belief refreshed": "(R-Kalman belief) lost positive definiteness to rounding: refreshed "
                        "from its damped factor, extra damping",
}


class FactorIncident(NamedTuple):
    """layer: its name; factor: "A" or "S"; kind: "extra damping" or "belief refreshed";
    refreshes: how often; extra_damping: the last τ added."""

    layer: str
    factor: str
    kind: str
    refreshes: int
    extra_damping: float


@dataclass
class Incidents:
    """Per-factor log. name_of(weight position) -> the layer's name (adapters give module
    paths); the default is the params container's key."""

    name_of: Callable[[int], str] | None = None
    log: dict[tuple[int, str, str], list] = field(default_factory=dict)
    quiet: bool = False  # a step's staging log (`staged`): it warns when merged

    def staged(self) -> Incidents:
        """An empty log for one step's records, kept apart until `merge` (a step skipped as
        non-finite discards them: its NaN, not rounding, broke the factorisation)."""
        return Incidents(name_of=self.name_of, quiet=True)

    def merge(self, step: Incidents) -> None:
        """Add a committed step's records (warning for each factor seen the first time)."""
        for key, (name, count, tau) in step.log.items():
            entry = self.log.setdefault(key, [name, 0, 0.0])
            first = entry[1] == 0
            entry[1] += count
            entry[2] = tau
            if first and not self.quiet:
                _warn(key, name, tau)

    def rescue(self, position: int, factor: str, key,
               kind: str = "extra damping") -> Callable[[float], None]:
        """The callable `linalg.cholesky_inverse` reports τ to, for one factor."""

        def record(tau: float) -> None:
            if position < 0:  # not a layer's factor (woodbury's batch system)
                name = str(key)
            else:
                name = self.name_of(position) if self.name_of else repr(key)
            entry = self.log.setdefault((position, factor, kind), [name, 0, 0.0])
            entry[1] += 1
            entry[2] = tau
            if entry[1] == 1 and not self.quiet:
                _warn((position, factor, kind), name, tau)

        return record

    def entries(self) -> tuple[FactorIncident, ...]:
        return tuple(FactorIncident(name, factor, kind, count, tau)
                     for (_, factor, kind), (name, count, tau) in sorted(self.log.items()))


def _warn(key: tuple[int, str, str], name: str, tau: float) -> None:
    position, factor, kind = key
    what = f"K-FAC factor {factor} of layer {name}" if position >= 0 else f"the {name} {factor}"
    warnings.warn(f"{what} {_WHAT[kind]} {tau:.3g} (counted; opt.describe() lists every such "
                  "factor). Raise damping or use state_dtype='float64' if it recurs.",
                  RuntimeWarning, stacklevel=user_stacklevel())
