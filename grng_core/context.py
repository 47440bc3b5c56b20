"""What one call of `update` knows besides the arrays: namespace, dtypes, flags, collectives."""

from __future__ import annotations

from typing import Any, NamedTuple


class StepContext(NamedTuple):
    """Per-call constants handed to the structures.

    xp: the array namespace; sdtype: the state dtype; t: the 1-based step (int array);
    first: bool array, true on the first curvature update (EMA starts from the batch);
    curvature / inverse: Python bool, or a bool array when decided in-graph;
    steady: (curvature, inverse) of the K-FAC layers that skip the warm-up, or None: every
        layer follows curvature / inverse (`grng_core.schedule.layer_flags`);
    mean / gather: collectives (identity when None); tol, max_iter, method: inverse settings;
    replicated: True when a collective mean exists (data-parallel replicas); replicas: their
        number (`Collective.replicas`);
    incidents: the host-side `Incidents` log extra damping is reported to.
    """

    xp: Any
    sdtype: Any
    device: Any
    t: Any
    first: Any
    curvature: Any
    inverse: Any
    mean: Any
    gather: Any
    tol: float
    max_iter: int
    method: str
    replicated: bool = False
    incidents: Any = None
    steady: Any = None
    replicas: int = 1


def select(flag, new, old, xp):
    """`new` where flag holds, else `old`; a Python bool picks without computing a where."""
    if flag is True:
        return new
    if flag is False:
        return old
    return xp.where(flag, new, old)
