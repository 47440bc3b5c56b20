"""When curvature statistics and inverses are refreshed (ALGORITHMS.md §2, §4).

One convention everywhere: `step` is the number of steps already taken (0 before the first),
a refresh happens when `step % every == 0`. The same function serves Python ints (eager
adapters, which then skip the work) and step-count arrays (decided in-graph under jit).
"""

from __future__ import annotations

import math

from grng_core.tree import index_of


def per_step_batch(config) -> bool:
    """True when the structure uses the current batch on every step (woodbury)."""
    return config.structure == "woodbury"


def warmup_steps(config) -> int:
    """Steps at the start that refresh statistics and inverses on every step (§2.1):
    `refresh_warmup`, or None: ⌈1/(1 − β)⌉, the horizon of the factors' EMA, so that the
    factors have averaged that many batches before refreshes thin out."""
    if config.refresh_warmup is not None:
        return config.refresh_warmup
    return math.ceil(round(1.0 / (1.0 - config.ema_decay), 9))


def flags(config, step):
    """(curvature, inverse) at `step` (steps already taken): bools for an int, bool arrays
    for an array. Every step of the warm-up refreshes both."""
    warm = step < warmup_steps(config)
    curvature, inverse = regular_flags(config, step)
    curvature = True if curvature is True else curvature | warm  # woodbury: a Python True
    return curvature, (inverse | warm) if inverse_period(config) else False


def regular_flags(config, step):
    """(curvature, inverse) of the schedule without the warm-up: every `curvature_every` and
    `inverse_period` steps from step 0 (woodbury: curvature on every step)."""
    curvature = True if per_step_batch(config) else (step % config.curvature_every) == 0
    period = inverse_period(config)
    return curvature, (step % period == 0) if period else False


def steady_flags(config, step):
    """The (curvature, inverse) flags of the K-FAC layers that skip the warm-up
    (`layer_warms` false): the schedule without it. None where every layer takes the
    warm-up's refreshes (no warm-up, `warmup_rows=None`, or past the warm-up on a host step)."""
    warm = warmup_steps(config)
    if not warm or config.warmup_rows is None or config.structure != "kfac":
        return None
    if isinstance(step, int) and step >= warm:
        return None
    return regular_flags(config, step)


def layer_warms(config, rows: int, d_a: int, d_s: int) -> bool:
    """Whether a K-FAC layer takes the warm-up's refreshes (§2.1): unless one step gives it
    `rows` >= warmup_rows·max(d_A, d_S) rows (a convolution's patches, a long sequence's
    tokens), whose single-batch factors are already estimated from many rows per dimension."""
    return config.warmup_rows is None or rows < config.warmup_rows * max(d_a, d_s)


def layer_flags(config, flags_now, steady, layouts, rows, replicas: int = 1) -> list:
    """(curvature, inverse) per K-FAC layer: `flags_now` for the layers that take the warm-up,
    `steady` for the others (and for a layer without rows on this step: an adapter leaves out
    the rows the layer would not use). `rows`: the layers' LayerRows on this replica, or None;
    a layer's rows per step are theirs times `replicas`."""
    if steady is None:
        return [flags_now] * len(layouts)
    rows = rows or [None] * len(layouts)
    return [flags_now if r is not None and layer_warms(config, r.s.shape[0] * replicas,
                                                       L.d_in_ext, L.d_out)
            else steady for L, r in zip(layouts, rows)]


def skipping_warmup(config, state, layer_stats, container, replicas: int = 1) -> set[int]:
    """Weight positions of the K-FAC layers whose rows of this step (`LayerStats`) skip the
    refresh warm-up (`layer_warms` false): what an adapter's `describe` lists."""
    layouts = {k.layout.weight: k.layout for k in (state.curvature.kfac or ())}
    out = set()
    for ls in layer_stats:
        w = index_of(container, ls.weight)
        L = layouts.get(w)
        rows = math.prod(ls.output_grads.shape) // max(L.d_out, 1) if L is not None else 0
        if L is not None and not layer_warms(config, rows * replicas, L.d_in_ext, L.d_out):
            out.add(w)
    return out


def inverse_period(config) -> int | None:
    """Steps between K-FAC inverse refreshes; R-Kalman's belief: its optional direct refresh
    (`kalman_refresh_every`, None: never, §3.3)."""
    if config.algorithm == "rkalman":
        return config.kalman_refresh_every
    return config.inverse_every


def flag_table(config):
    """The distinct (curvature, inverse) pairs and, per step of one period, which applies:
    (pairs, index) with pairs[index[step % len(index)]] the flags at `step` after the
    warm-up (`warmup_steps`); during it the flags are pairs[index[0]] (both refreshed).

    Only K-FAC keeps inverses: for the other structures the inverse flag is None (an unused
    in-graph flag), so that inverse_every does not multiply traced branches (grng_jax runs one
    `lax.switch` branch per pair).
    """
    kfac = config.structure == "kfac"
    period = config.curvature_every
    every = inverse_period(config)
    if kfac and every:
        period = math.lcm(period, every)
    table = [regular_flags(config, s) for s in range(period)]
    if not kfac:
        table = [(c, None) for c, _ in table]
    pairs = list(dict.fromkeys(table))
    return pairs, [pairs.index(f) for f in table]
