"""The decompositions RING's default form pays for its exact per-step damping (ALGORITHMS.md
§3.2 "adaptive_damping": the factors decomposed every `inverse_every` steps, after which
(A + π√c_t I)⁻¹ is exact for every c_t).

`eigh_floor` times `grng_core.linalg.eigh` on the row's own EMA factors after its warm-up
period (the same call the step makes, on the same matrices, best of ``repeats``) and divides
by the refresh interval: the share of the default form's step that no product can remove. The
report sets it against the target, so that a miss says where the time goes."""

from __future__ import annotations

import math
import time

from benchmarks.hyperparams import REFRESH_EVERY


def kfac_layers_of(stepper) -> tuple:
    """The K-FAC layers (`grng_core.state.KfacLayer`) of the stepper's optimizer, param group
    0 (() where it has none, or is not a GRNG optimizer)."""
    try:
        entry = stepper.opt.group_state(0)
        return tuple(entry.core.curvature.kfac or ())
    except AttributeError:
        return ()


def eigh_floor(stepper, repeats: int = 3, every: int = REFRESH_EVERY) -> dict | None:
    """{"seconds": amortised decomposition time per step, "sizes": the factors' sizes,
    "per_refresh": seconds per refresh} for a RING whose K-FAC layers keep eigenbases (the
    default form with inverse_every > 1); None for any other row."""
    import array_api_compat

    from grng_core.linalg import eigh

    layers = [L for L in kfac_layers_of(stepper) if L.S_vecs is not None]
    if not layers:
        return None
    mats = [M for L in layers for M in (L.A, L.S) if M.ndim == 2]
    xp = array_api_compat.array_namespace(mats[0])
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for M in mats:
            e, _ = eigh(M, xp)
        float(e[0])  # waits for an accelerator's queued decompositions (a no-op on the CPU)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best / every, "per_refresh": best,
            "sizes": [int(M.shape[0]) for M in mats]}
