"""The optimizer object shared by RENG, RING and R-Kalman (ALGORITHMS.md §3, §4).

`Optimizer.init(params, layers=None) -> OptState` and
`Optimizer.update(grads, state, params, stats=None, oracle=None, *, collective=None,
curvature=None, inverse=None) -> (updates, OptState)` are pure: no in-place writes, arrays only
in the state, no Python branch on array values (host values are used only where they exist,
see `concrete`). What differs between the three algorithms is the `Algorithm` record
(`grng_core.algorithms`): its direction and its curvature state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

from grng_core import guard, schedule, tail
from grng_core.concrete import concrete_bool, host_bool
from grng_core.config import Config, value_at
from grng_core.context import StepContext
from grng_core.direction import Env
from grng_core.incidents import Incidents
from grng_core.linalg import default_tol
from grng_core.requirements import requirements
from grng_core.state import OptState, ensure_pytrees
from grng_core.structures import explained, kfac
from grng_core.structures.input_gram import input_arrays
from grng_core.tree import device, flatten, leaves_like, namespace
from grng_core.types import Collective, Requirements, Stats, Whole
from grng_core.validation import check_params, check_shapes, check_state


def _identity(x):
    return x


class Pending(NamedTuple):
    """A part's direction between `Optimizer.prepare` and `Optimizer.finish`."""

    env: Env
    state: OptState
    d: list
    ghat: list
    curvature: Any
    lr: Any
    kl_term: Any  # η²⟨d, ĝ⟩, or None where no trust region reads it
    log: Incidents
    stage: Incidents
    layer_arrays: list


@dataclass(frozen=True)
class Optimizer:
    """A gradient transformation: `init` and `update` as in optax, plus what adapters need.

    config: the validated hyperparameters (`grng_core.config`); algorithm: the direction and
    curvature-state functions of RENG, RING or R-Kalman.
    """

    config: Config
    algorithm: Any

    @property
    def name(self) -> str:
        return self.config.algorithm

    @functools.cached_property
    def requirements(self) -> Requirements:
        """What the adapter collects (a function of the frozen config: computed once)."""
        return requirements(self.config)

    def replace(self, **changes) -> Optimizer:
        """The same algorithm with validated hyperparameter changes."""
        return Optimizer(self.config.replace(**changes), self.algorithm)

    def resolve(self, layers, fallback: str = "diagonal") -> Optimizer:
        """The optimizer that runs for this layer layout: structure "kfac" with no layer is
        `fallback` ("diagonal", the same math on every leaf, or "woodbury")."""
        if fallback not in ("diagonal", "woodbury"):
            raise ValueError(f"invalid fallback={fallback!r}: allowed 'diagonal' or 'woodbury'")
        if self.config.structure == "kfac" and not layers:
            return self.replace(structure=fallback)
        return self

    def too_large(self, params, layers) -> list[str | None]:
        """Per K-FAC LayerSpec of `params` (validated as `init` does): why `max_factor_dim`
        leaves it to the diagonal structure, or None where it stays a K-FAC layer (§2.1). The
        adapters apply it where the layers are chosen (dropped and reported where they find
        them, refused where the user lists them); `init` does not, so a state saved under
        another limit loads as it was built."""
        if self.config.structure != "kfac" or not layers:
            return [None] * len(layers or ())
        leaves, container = flatten(params)
        return [kfac.oversized(L, self.config.max_factor_dim)
                for L in kfac.resolve(layers, container, leaves)]

    def check_sizes(self, params, layers) -> None:
        """Refuse LayerSpecs a user listed whose factors exceed `max_factor_dim` (§2.1)."""
        for spec, why in zip(layers or (), self.too_large(params, layers)):
            if why is not None:
                raise ValueError(f"K-FAC layer {spec.weight!r}: {why}, or leave it out of the "
                                 "layers (its parameters then use the diagonal structure; §2.1)")

    def unexplained(self, grads, state: OptState, params, stats: Stats) -> list:
        """Keys of the K-FAC layers whose gradient `grads` is not c·sᵀa/B + α·W + β·b for their
        `stats` rows (§2.1 "This project": a use of the weight outside the layer's calls, or a
        gradient edited per element); a host read per layer (on an accelerator too), for an
        adapter's first step (not under jit; not across replicas, whose averaged gradient no
        replica's rows give)."""
        return [k for k, ok in self.explained_flags(grads, state, params, stats)
                if concrete_bool(ok) is False]

    def explained_flags(self, grads, state: OptState, params, stats: Stats) -> list:
        """[(weight key, 0-d bool array)] of `unexplained`'s check, without a host read (under
        jit: grng_jax reports the flags through a callback)."""
        stats = stats.rows_present()
        if (self.config.structure != "kfac" or self.config.fisher != "empirical"
                or not stats.layers or not state.curvature.kfac):
            return []  # fisher "mc": the rows are of sampled labels, not the gradient's
        p_leaves, container = flatten(params)
        g_leaves = leaves_like(grads, container, "grads")
        xp = namespace(("params", p_leaves), ("grads", g_leaves))
        place = explained.Place(xp, self.state_dtype(p_leaves, xp), device(p_leaves[0]))
        layers = state.curvature.kfac
        matched = kfac.match_stats(layers, stats.layers, container, partial=True,
                                   absent=stats.absent)
        return [(container.keys[layer.layout.weight],
                 explained.explained(layer.layout, ls, g_leaves, p_leaves, place))
                for layer, ls in zip(layers, matched)
                if ls is not None and g_leaves[layer.layout.weight] is not None]

    def flags(self, step):
        """(curvature, inverse) refresh flags at `step` steps taken (`grng_core.schedule`)."""
        return schedule.flags(self.config, step)

    def steady_flags(self, step):
        """The flags of the K-FAC layers that skip the warm-up, or None (every layer follows
        `flags`): pass them as `update(steady=)` beside explicit flags (`grng_core.schedule`)."""
        return schedule.steady_flags(self.config, step)

    # ---- state
    def state_dtype(self, leaves, xp):
        name = self.config.state_dtype
        if name is not None:
            return getattr(xp, name)
        return xp.float64 if any(x.dtype == xp.float64 for x in leaves) else xp.float32

    def init(self, params, layers=None) -> OptState:
        """The zero state; `layers`: K-FAC LayerSpecs (structure "kfac")."""
        ensure_pytrees()
        leaves, container = flatten(params)
        xp = namespace(("params", leaves))
        check_params(container, leaves, xp)
        dev = device(leaves[0])
        sdtype = self.state_dtype(leaves, xp)
        layouts = []
        if self.config.structure == "kfac":
            if layers is None:
                raise ValueError("structure 'kfac' needs the layer layout at init: opt.init("
                                 "params, layers=[gc.LayerSpec(weight=key, bias=key_or_None), "
                                 "...]) (or opt.resolve(layers) for a model without layers)")
            layouts = kfac.resolve(layers, container, leaves)

        def scalar():
            return xp.zeros((), dtype=xp.int32, device=dev)

        momentum = None
        if self.config.momentum != 0.0:
            momentum = tuple(xp.zeros(x.shape, dtype=sdtype, device=dev) for x in leaves)
        curvature = self.algorithm.init(self.config, layouts, leaves, xp, sdtype, dev)
        return OptState(step=scalar(), skipped=scalar(), curvature_count=scalar(),
                        momentum=momentum, curvature=curvature)

    # ---- the step
    def update(self, grads, state: OptState, params, stats: Stats | None = None, oracle=None,
               *, collective: Collective | None = None, curvature=None, inverse=None,
               steady=None, incidents: Incidents | None = None):
        """(updates, new state). curvature / inverse: refresh flags (None: the schedule's at
        the state's step); steady: the flags of the K-FAC layers that skip the warm-up (None:
        the schedule's when the flags are left to it, else the flags themselves).
        `incidents`: the host-side log a K-FAC factor that needs extra damping is reported to
        (`grng_core.incidents`; default: a fresh one, which warns)."""
        return self.finish(self.prepare(grads, state, params, stats, oracle,
                                        collective=collective, curvature=curvature,
                                        inverse=inverse, steady=steady, incidents=incidents))

    def prepare(self, grads, state: OptState, params, stats: Stats | None = None, oracle=None,
                *, collective: Collective | None = None, curvature=None, inverse=None,
                steady=None, incidents: Incidents | None = None,
                whole: Whole | None = None) -> Pending:
        """The direction of one part of a model (`update` is `finish(prepare(...))`): for a
        model split into parts (torch parameter groups), `whole` gives what the direction
        reads of the whole model, and each part's `Pending.kl_term` is summed for `finish`."""
        ensure_pytrees()
        log = incidents if incidents is not None else Incidents()
        stage = log.staged()  # merged once the step is known not to be skipped
        env, layer_arrays = self._env(grads, state, params, (stats or Stats()).rows_present(),
                                      oracle, collective, (curvature, inverse, steady), stage,
                                      None if whole is None else whole.grad_sq_norm)
        h, ctx = self.config, env.ctx
        d, ghat, new_curv = self.algorithm.direction(env, state.curvature)
        lr = _scalar(value_at(h.lr, ctx.t), ctx.xp, ctx.sdtype)
        term = None  # the trust region's η²⟨d, ĝ⟩ (kl_clip inf is read as None, off)
        if h.kl_clip is not None or (whole is not None and whole.kl):
            term = tail.kl_term(d, ghat, lr, ctx.xp)
        return Pending(env, state, d, ghat, new_curv, lr, term, log, stage, layer_arrays)

    def finish(self, p: Pending, kl_total=None):
        """(updates, new state) of a prepared direction: trust region (over `kl_total`, the
        parts' summed `kl_term`, where given), momentum, the update, the non-finite guard."""
        h, env, state = self.config, p.env, p.state
        ctx, xp, d = env.ctx, env.ctx.xp, p.d
        nu = None
        if h.kl_clip is not None:
            nu = tail.kl_scale(p.kl_term if kl_total is None else kl_total,
                               value_at(h.kl_clip, ctx.t), xp)
        momentum = state.momentum  # created when momentum is switched on, dropped when off
        if h.momentum != 0.0:
            if momentum is None:
                momentum = tuple(xp.zeros(x.shape, dtype=ctx.sdtype, device=ctx.device)
                                 for x in d)
            d = tail.momentum(momentum, d, h.momentum, xp, nu)
            momentum, nu = tuple(d), None
        else:
            momentum = None
        updates = tail.updates(d, env.params, p.lr, h.weight_decay, xp, ctx.sdtype, scale=nu)
        new_state = OptState(step=ctx.t, skipped=state.skipped,
                             curvature_count=env.curvature_count, momentum=momentum,
                             curvature=p.curvature)
        used_stats = [] if ctx.curvature is False else (env.per_example or []) + p.layer_arrays
        groups = {"gradients": env.g,
                  "the regularized gradient (oracle results)": [] if p.ghat is env.g else p.ghat,
                  "curvature statistics": used_stats, "the update": updates}
        ups, out = guard.commit(updates, new_state, state, groups, ctx, h.on_nonfinite)
        if p.stage.log and host_bool(out.skipped == state.skipped) is not False:
            p.log.merge(p.stage)  # a skipped step's records are dropped (its NaN broke them)
        return env.container.build(ups), out

    def _env(self, grads, state, params, stats, oracle, collective, refresh, incidents,
             whole_sq_norm=None):
        """Checks the inputs and gathers what the direction reads (an `Env`)."""
        h = self.config
        p_leaves, container = flatten(params)
        g_leaves = leaves_like(grads, container, "grads")
        pe = None
        if stats.per_example_grads is not None:
            pe = leaves_like(stats.per_example_grads, container, "stats.per_example_grads")
        layer_arrays = [x for ls in (stats.layers or ()) for x in (*input_arrays(ls.inputs),
                                                                    ls.output_grads)]
        xp = namespace(("params", p_leaves), ("grads", g_leaves),
                       ("stats.per_example_grads", pe or []), ("stats.layers", layer_arrays))
        check_params(container, p_leaves, xp)
        check_shapes(container, p_leaves, g_leaves, pe, xp)
        check_state(state, self, p_leaves)
        sdtype = self.state_dtype(p_leaves, xp)
        dev = device(p_leaves[0])
        curvature, inverse, steady = self._flags(state.step, *refresh)
        mean = _identity if collective is None or collective.mean is None else collective.mean
        gather = _identity if collective is None or collective.gather is None else collective.gather
        count = state.curvature_count
        ctx = StepContext(xp=xp, sdtype=sdtype, device=dev, t=state.step + 1, first=count == 0,
                          curvature=curvature, inverse=inverse, steady=steady, mean=mean,
                          gather=gather,
                          tol=h.ns_tol if h.ns_tol is not None else default_tol(sdtype, xp),
                          max_iter=h.ns_max_iter, method=h.inverse_method,
                          replicated=collective is not None and collective.mean is not None,
                          incidents=incidents,
                          replicas=1 if collective is None else int(collective.replicas))
        if curvature is not False:
            count = count + xp.astype(xp.asarray(curvature, device=dev), xp.int32, copy=False)
        g = [xp.astype(x, sdtype, copy=False) for x in g_leaves]
        env = Env(config=h, ctx=ctx, container=container, params=p_leaves, g=g,
                  per_example=pe, stats=stats, oracle=oracle, curvature_count=count,
                  rho=_scalar(value_at(h.rho, ctx.t), xp, sdtype),
                  damping=_scalar(value_at(h.damping, ctx.t), xp, sdtype),
                  whole_sq_norm=None if whole_sq_norm is None
                  else xp.astype(whole_sq_norm, sdtype, copy=False))
        return env, layer_arrays

    def _flags(self, step, curvature, inverse, steady):
        """The refresh flags of this call: the adapter's, else the schedule's at `step`."""
        if schedule.per_step_batch(self.config):
            curvature = True
        if curvature is None or inverse is None:  # the adapter left them to the schedule
            auto_curv, auto_inv = (_host_flag(f) for f in self.flags(step))
            curvature = auto_curv if curvature is None else curvature
            inverse = auto_inv if inverse is None else inverse
            if steady is None:
                steady = self.steady_flags(step)
        if steady is not None:
            steady = tuple(_host_flag(f) for f in steady)
        return curvature, inverse, steady


def _host_flag(flag):
    """A refresh flag as a Python bool where reading it is free (host arrays), so an eager
    step skips the work it does not need instead of computing and discarding it."""
    if isinstance(flag, bool):
        return flag
    value = host_bool(flag)
    return flag if value is None else value


def _scalar(v, xp, sdtype):
    """A hyperparameter's value at t: Python numbers stay numbers, arrays go to the state dtype."""
    if isinstance(v, (int, float)):
        return v
    return xp.astype(xp.asarray(v), sdtype, copy=False)


__all__ = ["Optimizer"]
