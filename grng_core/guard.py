"""Non-finite steps leave everything untouched (ALGORITHMS.md §4).

`commit` checks, as one boolean array (from one sum per array, `sums_finite`; on the host a
failed check is confirmed elementwise), the update and the state the step recomputed (a
non-finite gradient or oracle result always reaches one of them; statistics are checked
themselves wherever the step may consume them, since a where-selected refresh would hide them).
When the check fails the old state (with `skipped` + 1) and zero updates are returned: selected
with `xp.where` under jit and for accelerator arrays (no device-to-host read per step: the
adapters read the counter later and `report`), directly with host arrays, where `explain` then
warns naming what was non-finite, or raises (`on_nonfinite="raise"`, which reads the verdict).
"""

from __future__ import annotations

import warnings

from grng_core.concrete import concrete_bool, host_bool
from grng_core.state import changed_arrays, map_arrays
from grng_core.user_frame import user_stacklevel


def finite(arrays, xp):
    """True when every array holds only finite values (a 0-d bool array), exactly."""
    ok = None
    for x in arrays:
        f = xp.all(xp.isfinite(x))
        ok = f if ok is None else (ok & f)
    return ok


def sums_finite(arrays, xp):
    """True when every array's sum is finite (a 0-d bool array): one reduction per array, no
    elementwise mask (about 18x cheaper than `finite` on a CPU), the sums stacked per dtype so
    that one `isfinite` serves them all. A NaN or Inf element always makes its sum non-finite;
    a finite array whose sum overflows reads as non-finite too."""
    by_dtype: dict = {}
    for x in arrays:
        by_dtype.setdefault(x.dtype, []).append(x)
    ok = None
    for dtype, xs in by_dtype.items():
        if not xp.isdtype(dtype, ("real floating", "complex floating")):
            continue  # integer counters are always finite
        f = xp.all(xp.isfinite(xp.stack([xp.sum(x) for x in xs])))
        ok = f if ok is None else (ok & f)
    return ok


def commit(updates, new_state, old_state, groups: dict, ctx, on_nonfinite: str):
    """(updates, state) after the non-finite check; `groups` ({description: arrays}) name
    the culprits after a failure, off the hot path."""
    xp = ctx.xp
    changed = changed_arrays(new_state, old_state)
    checked = updates + changed + groups["curvature statistics"]
    ok = sums_finite(checked, xp)
    if ctx.replicated:
        # one verdict for all replicas: a step skipped anywhere is skipped everywhere
        ok = ctx.mean(xp.astype(ok, ctx.sdtype)) >= 1
    # no device-to-host read on accelerators (the step is where-selected, adapters report
    # skips afterwards, `report`); "raise" needs the verdict now
    host_ok = concrete_bool(ok) if on_nonfinite == "raise" else host_bool(ok)
    if host_ok is False and not ctx.replicated and concrete_bool(finite(checked, xp)):
        host_ok = True  # only a sum overflowed: every element is finite
    if host_ok:
        return updates, new_state
    skipped = old_state._replace(skipped=old_state.skipped + 1)
    zeros = [xp.zeros_like(u) for u in updates]
    if host_ok is False:
        explain({**groups, "the new optimizer state": changed}, xp, on_nonfinite)
        return zeros, skipped
    kept = map_arrays(lambda n, o: xp.where(ok, n, o), new_state, skipped)
    kept = kept._replace(skipped=old_state.skipped + xp.astype(~ok, xp.int32, copy=False))
    return [xp.where(ok, u, z) for u, z in zip(updates, zeros)], kept


def report(newly_skipped: int, on_nonfinite: str = "skip", where: str = "") -> None:
    """For adapters that read the skip counter after the step (accelerator arrays): warn, or
    raise FloatingPointError, about `newly_skipped` steps skipped as non-finite."""
    if newly_skipped <= 0:
        return
    msg = (f"non-finite values (NaN or Inf){where}: {newly_skipped} step(s) skipped, parameters "
           "and optimizer state unchanged by them")
    if on_nonfinite == "raise":
        raise FloatingPointError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())


def explain(groups: dict, xp, on_nonfinite: str) -> None:
    """After a failed check (concrete values): warn, or raise FloatingPointError for
    on_nonfinite="raise", naming the groups ({description: arrays}) that hold NaN or Inf."""
    bad = [name for name, arrays in groups.items()
           if arrays and not concrete_bool(finite(arrays, xp))]
    where = ", ".join(bad) if bad else "another replica's inputs"
    msg = (f"non-finite values (NaN or Inf) in {where}: "
           "the step was skipped, parameters and optimizer state are unchanged")
    if on_nonfinite == "raise":
        raise FloatingPointError(msg.replace("the step was skipped", "refusing the step"))
    warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())
