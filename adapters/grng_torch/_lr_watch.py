"""A learning-rate change the trust region overrides, said once (README "`lr`, schedules and
weight decay under the trust region").

While the KL trust region binds (ALGORITHMS.md §3 tail: ν = min(1, √(κ / (η² |⟨d, ĝ⟩|))) < 1)
the step is √(κ / |⟨d, ĝ⟩|)·d whatever η is, so a scheduler that lowers `lr` changes nothing
until η falls below η·ν of the last step. Each step keeps its group's trust-region term
η²⟨d, ĝ⟩ on the device (no host read); when a group's `lr` differs from the one of its last
step, the kept term is read once (one host read in the run) and, if the region bound, a
warning names the value below which `lr` takes effect and the fix.
"""

from __future__ import annotations

import warnings
from typing import Any

from grng_core.tail import kl_scale
from grng_core.user_frame import user_stacklevel


class LrWatch:
    """Per optimizer: each group's last lr and trust-region term; warns once."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[float, Any, float]] = {}  # group -> (lr, term, kl_clip)
        self.warned = False

    def record(self, group: int, lr, term, kl_clip) -> None:
        """After a group's step: its lr (a Python number) and its η²⟨d, ĝ⟩ (None: no trust
        region)."""
        if self.warned or term is None or not isinstance(lr, (int, float)) \
                or not isinstance(kl_clip, (int, float)):  # off, or a schedule
            self.last.pop(group, None)
            return
        self.last[group] = (float(lr), term, float(kl_clip))

    def record_step(self, groups, prepared, total) -> None:
        """`record` for every group of a step: its (entry, core, Pending), and the summed
        term of a model split into groups (None: each group's own)."""
        for gp, (_, core, p) in zip(groups, prepared):
            self.record(gp.index, gp.group["lr"], p.kl_term if total is None else total,
                        core.config.kl_clip)

    def check(self, opt) -> None:
        """Before a step: warn once if a group's lr changed while its last step was clipped."""
        if self.warned:
            return
        for i, (lr, term, kappa) in list(self.last.items()):
            now = opt.param_groups[i]["lr"] if i < len(opt.param_groups) else lr
            if not isinstance(now, (int, float)) or float(now) == lr:
                continue
            del self.last[i]
            nu = float(kl_scale(term, kappa, _xp(term)))  # the one host read
            if nu < 1.0:
                self.warned = True
                _warn(opt, i, lr, float(now), nu, kappa)
                return


def _xp(term):
    from array_api_compat import array_namespace

    return array_namespace(term)


def _warn(opt, i: int, before: float, now: float, nu: float, kappa: float) -> None:
    warnings.warn(
        f"{type(opt).__name__}: param group {i}'s lr changed from {before:.3g} to {now:.3g} "
        f"(a scheduler?), but the KL trust region (kl_clip={kappa:g}) shortened the last step "
        f"to {nu:.2g} of its length: while it binds, the step is √(kl_clip / |⟨d, ĝ⟩|)·d "
        f"whatever lr is, so lr changes take effect only below about {before * nu:.2g}. To "
        "let lr (and its schedule) shape every step, schedule kl_clip instead (a param "
        "group's 'kl_clip' can be set between steps) or turn the trust region off with "
        "kl_clip=None (README \"lr, schedules and weight decay under the trust region\").",
        UserWarning, stacklevel=user_stacklevel())
