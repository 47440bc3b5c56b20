"""The optimizer object shared by RENG, RING and R-Kalman (ALGORITHMS.md §3, §4).

`Optimizer.init(params, layers=None) -> state` and
`Optimizer.update(grads, state, params, stats=None, oracle=None, *, collective=None,
curvature=None, inverse=None) -> (updates, state)` are pure: no in-place writes, arrays only
in the state, no Python branch on array values (host values are used only where they exist,
see `concrete`). What differs between the three algorithms is the `direction` function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grng_core import estimators, guard, tail
from grng_core.concrete import concrete_bool
from grng_core.context import StepContext
from grng_core.hyperparams import is_static_zero, value_at
from grng_core.linalg import default_tol
from grng_core.tree import Container, device, flatten, leaves_like, namespace
from grng_core.types import Collective, Requirements, Stats

_LOW_PRECISION = ("float16", "bfloat16")


def _identity(x):
    return x


@dataclass(frozen=True)
class Optimizer:
    """A gradient transformation: `init` and `update` as in optax, plus what adapters need."""

    name: str
    hyperparams: dict
    requirements: Requirements
    direction: Callable = field(repr=False)
    init_direction: Callable = field(repr=False)

    # ---- schedules of refreshes (host side, for adapters with a step counter) ----
    @property
    def per_step_batch(self) -> bool:
        """True when the structure uses the current batch on every step (woodbury)."""
        return self.hyperparams["structure"] == "woodbury"

    def refresh_flags(self, t: int) -> tuple[bool, bool]:
        """(curvature, inverse) for the 1-based step t."""
        h = self.hyperparams
        curvature = self.per_step_batch or (t - 1) % h["curvature_every"] == 0
        inverse = (t - 1) % h["inverse_every"] == 0
        return bool(curvature), bool(inverse)

    # ---- state ----
    def state_dtype(self, leaves, xp):
        name = self.hyperparams["state_dtype"]
        if name is not None:
            return getattr(xp, name)
        if any(x.dtype == xp.float64 for x in leaves):
            return xp.float64
        return xp.float32

    def _setup(self, params, extra=()):
        leaves, container = flatten(params)
        xp = namespace(("params", leaves), *extra)
        for k, x in zip(container.keys, leaves):
            if not _is_real_float(x.dtype, xp):
                raise TypeError(f"params leaf {k!r} has dtype {x.dtype}: GRNG needs real "
                                "floating-point parameters (float16, bfloat16, float32, float64)")
        return leaves, container, xp

    def init(self, params, layers=None) -> dict:
        leaves, container, xp = self._setup(params)
        dev = device(leaves[0])
        sdtype = self.state_dtype(leaves, xp)

        def scalar(dtype):
            return xp.zeros((), dtype=dtype, device=dev)

        state = {"step": scalar(xp.int32), "skipped": scalar(xp.int32),
                 "curvature_count": scalar(xp.int32)}
        if self.hyperparams["momentum"] != 0.0:
            state["momentum"] = [xp.zeros(x.shape, dtype=sdtype, device=dev) for x in leaves]
        state.update(self.init_direction(self, leaves, container, layers, xp, sdtype, dev))
        return state

    # ---- the step ----
    def update(self, grads, state, params, stats: Stats | None = None, oracle=None, *,
               collective: Collective | None = None, curvature=None, inverse=None):
        h = self.hyperparams
        stats = stats or Stats()
        p_leaves, container = flatten(params)
        g_leaves = leaves_like(grads, container, "grads")
        pe = None
        if stats.per_example_grads is not None:
            pe = leaves_like(stats.per_example_grads, container, "stats.per_example_grads")
        layer_arrays = [x for ls in (stats.layers or ()) for x in (ls.inputs, ls.output_grads)]
        _, _, xp = self._setup(params, (("grads", g_leaves), ("stats.per_example_grads", pe or []),
                                        ("stats.layers", layer_arrays)))
        _check_shapes(container, p_leaves, g_leaves, pe)
        _check_state(state, self, p_leaves)
        sdtype = self.state_dtype(p_leaves, xp)
        dev = device(p_leaves[0])
        step = state["step"]
        t = step + 1
        count = state["curvature_count"]
        if self.per_step_batch:
            curvature = True
        if curvature is None:
            curvature = (step % h["curvature_every"]) == 0
        if inverse is None:
            inverse = (step % h["inverse_every"]) == 0
        mean = _identity if collective is None or collective.mean is None else collective.mean
        gather = _identity if collective is None or collective.gather is None else collective.gather
        ctx = StepContext(xp=xp, sdtype=sdtype, device=dev, t=t, first=count == 0,
                          curvature=curvature, inverse=inverse, mean=mean, gather=gather,
                          tol=h["ns_tol"] if h["ns_tol"] is not None else default_tol(sdtype, xp),
                          max_iter=h["ns_max_iter"], method=h["inverse_method"])

        def hp(name):
            v = value_at(h[name], t)
            if isinstance(v, (int, float)):
                return v
            return xp.astype(xp.asarray(v), sdtype, copy=False)

        lr, rho, damping = hp("lr"), hp("rho"), hp("damping")
        g = [xp.astype(x, sdtype, copy=False) for x in g_leaves]
        if curvature is False:
            new_count = count
        else:
            new_count = count + xp.astype(xp.asarray(curvature, device=dev), xp.int32, copy=False)
        env = _Env(self, ctx, container, p_leaves, g, pe, stats, oracle, rho, damping, new_count)
        d, ghat, new_state = self.direction(env, state)

        if h["kl_clip"] is not None:
            d = tail.kl_clip(d, ghat, lr, h["kl_clip"], xp)
        if "momentum" in state:
            d = tail.momentum(state["momentum"], d, h["momentum"])
            new_state["momentum"] = d
        updates = tail.updates(d, p_leaves, lr, h["weight_decay"], xp, sdtype)
        new_state["curvature_count"] = new_count
        new_state["step"] = t
        new_state["skipped"] = state["skipped"]

        # A non-finite gradient or oracle result always reaches the update or the state this
        # step recomputed; statistics are checked themselves wherever the step may consume
        # them (a where-selected refresh would hide them). The culprit is named only after a
        # failure, off the hot path.
        used_stats = [] if curvature is False else (pe or []) + layer_arrays
        ok = guard.finite(updates + guard.changed_leaves(new_state, state) + used_stats, xp)
        if collective is not None and collective.mean is not None:
            # one verdict for all replicas: a step skipped anywhere is skipped everywhere
            ok = mean(xp.astype(ok, sdtype)) >= 1
        host_ok = concrete_bool(ok)
        if host_ok:
            return container.build(updates), new_state
        skipped = {**state, "skipped": state["skipped"] + 1}
        zeros = [xp.zeros_like(u) for u in updates]
        if host_ok is False:
            guard.explain({
                "gradients": g,
                "the regularized gradient (oracle results)": [] if ghat is g else ghat,
                "curvature statistics": used_stats,
                "the update": updates,
                "the new optimizer state": guard.changed_leaves(new_state, state),
            }, xp, h["on_nonfinite"])
            return container.build(zeros), skipped
        kept = guard.tree_map2(lambda n, o: xp.where(ok, n, o), new_state, skipped)
        kept["skipped"] = state["skipped"] + xp.astype(~ok, xp.int32, copy=False)
        return container.build([xp.where(ok, u, z) for u, z in zip(updates, zeros)]), kept


@dataclass
class _Env:
    """Everything a direction function reads for one step."""

    opt: Any
    ctx: StepContext
    container: Container
    params: list
    g: list
    per_example: list | None
    stats: Stats
    oracle: Any
    rho: Any
    damping: Any
    curvature_count: Any

    @property
    def h(self):
        return self.opt.hyperparams

    def regularized_gradient(self) -> list:
        """ĝ by the configured estimator (§1); ρ = 0 (constant) needs no oracle."""
        h = self.h
        if is_static_zero(h["rho"]):
            return self.g
        if h["gr"] == "double_backprop":
            return estimators.double_backprop(self.g, self.params, self.rho, self.oracle,
                                              self.container, self.ctx)
        return estimators.finite_difference(self.g, self.params, self.rho, h["fd_radius"],
                                            h["fd_scheme"], self.oracle, self.container,
                                            self.ctx)


def _is_real_float(dtype, xp) -> bool:
    names = ("float16", "bfloat16", "float32", "float64")
    return any(hasattr(xp, n) and dtype == getattr(xp, n) for n in names) or str(dtype).endswith(
        "bfloat16")


def _check_shapes(container, params, grads, pe):
    for k, p, g in zip(container.keys, params, grads):
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"grads leaf {k!r} has shape {tuple(g.shape)}, the parameter has "
                             f"{tuple(p.shape)}")
    if pe is not None:
        B = pe[0].shape[0]
        for k, p, j in zip(container.keys, params, pe):
            if tuple(j.shape) != (B, *p.shape):
                raise ValueError(f"stats.per_example_grads leaf {k!r} has shape "
                                 f"{tuple(j.shape)}, expected ({B}, *{tuple(p.shape)})")


def _check_state(state, opt, leaves):
    if not isinstance(state, dict) or "step" not in state:
        raise TypeError("state must be the dict returned by this optimizer's init")
    if ("momentum" in state) != (opt.hyperparams["momentum"] != 0.0):
        raise ValueError("state does not match this optimizer: momentum buffers "
                         f"{'present' if 'momentum' in state else 'absent'}, momentum="
                         f"{opt.hyperparams['momentum']}")
    if "momentum" in state:
        for m, p in zip(state["momentum"], leaves):
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"state does not match params: momentum buffer shape "
                                 f"{tuple(m.shape)} vs parameter {tuple(p.shape)}")


__all__ = ["Optimizer"]
