"""RENG, RING and R-Kalman as optax gradient transformations over grng_core.

The adapter flattens the params pytree into a list of leaves, collects what the core needs
from ``loss_fn`` and ``batch`` with JAX's transformations (grad, vmap, jvp, the perturbation
pass of grng_jax._tags), calls the core's pure ``update`` and rebuilds the pytree. The policy
(which structure runs without layers, when curvature and inverses are refreshed) is the core's:
``Optimizer.resolve`` and ``grng_core.schedule.flag_table``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from jax import lax

import grng_core as gc
from grng_core import hoisted_oracle
from grng_core.algorithms import BUILDERS
from grng_core.config import CONFIGS
from grng_core.schedule import flag_table, warmup_steps
from grng_core.state import ensure_pytrees
from grng_core.user_frame import user_stacklevel
from grng_jax import _collect, _masking, _nested, _nnx
from grng_jax._diagonal_reasons import warn_if_mostly_diagonal, warn_if_oversized
from grng_jax._explained import check_first_step
from grng_jax._flax_serialization import register_if_flax
from grng_jax._hyper import concrete_number, core_kwargs
from grng_jax._layers import batch_coupled, batch_size, leaf_paths, resolve_layers

REFRESH = ("switch", "where")
FALLBACKS = ("diagonal", "woodbury")

ensure_pytrees()  # K-FAC layouts are static pytree metadata, also before the first init


class GRNGState(NamedTuple):
    """Optimizer state: a pytree of arrays.

    core: the grng_core state (`grng_core.OptState`; ``core.step`` counts the steps taken).
    key: a raw PRNG key (uint32[2]) for the labels sampled by ``fisher="mc"``.
    """

    core: gc.OptState
    key: jax.Array


class _Options(NamedTuple):
    """The adapter options of one transformation (not passed to the core)."""

    name: str
    axis_name: Any
    layers: Any
    refresh: str
    fallback: str
    seed: int


class _Batch(NamedTuple):
    """What one ``update`` call was given besides grads, state and params."""

    loss_fn: Callable | None
    batch: Any
    mc_loss_fn: Callable | None
    key: Any
    accumulated: bool = False  # the gradient is a mean over micro-batches (`multi_steps`)


def transform(name: str, kwargs: dict, *, axis_name=None, layers="auto", refresh="switch",
              fallback="diagonal", seed=None) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of algorithm `name` with core keyword arguments `kwargs` (None:
    the core's default). Its ``init`` and ``update`` carry the core optimizer as
    ``.grng_core`` (and the fallback structure as ``.grng_fallback``) for checkpoints."""
    if refresh not in REFRESH:
        raise ValueError(f"invalid refresh={refresh!r}: allowed 'switch' or 'where'")
    if fallback not in FALLBACKS:
        raise ValueError(f"invalid fallback={fallback!r}: allowed 'diagonal' or 'woodbury'")
    seed = 0 if seed is None else concrete_number("seed", seed, integer=True)
    opts = _Options(name, axis_name, layers, refresh, fallback, seed)
    core_main = BUILDERS[name](**core_kwargs(CONFIGS[name], kwargs))  # validates everything

    def init_fn(params):
        register_if_flax()
        _check_float_leaves(name, params)
        core, specs, oversized = _setup(core_main, params, opts)
        if core_main.config.structure == "kfac":
            warn_if_oversized(name, params, oversized)
            covered = {i for r in specs or () for i in (r.weight, r.bias) if i is not None}
            warn_if_mostly_diagonal(name, params, covered, layers, oversized)
        return _init(core, specs, params, seed)

    def update_fn(updates, state, params=None, *, loss_fn=None, batch=None, mc_loss_fn=None,
                  key=None, full_params=None, **extra_args):
        # grng_jax.multi_steps says its gradient is a mean over micro-batches; the other
        # arguments are meant for other transformations of an optax.chain
        accumulated = bool(extra_args.get("grng_accumulated", False))
        if params is None:
            raise ValueError(f"grng_jax.{name} needs params: opt.update(grads, state, params, "
                             "loss_fn=..., batch=...)")
        if not isinstance(state, GRNGState):
            raise TypeError(f"state must be the GRNGState returned by grng_jax.{name}(...).init")
        core, specs, _ = _setup(core_main, params, opts, state)
        _check_vma(name, opts.axis_name, batch)
        loss_fn, mc_loss_fn = _masking.unmask(name, params, full_params, loss_fn, mc_loss_fn)
        loss_fn = _nnx.hinted(name, loss_fn, params)
        return _update(core, specs, opts, updates, state, params,
                       _Batch(loss_fn, batch, mc_loss_fn, key, accumulated))

    for fn in (init_fn, update_fn):
        setattr(fn, "grng_core", core_main)  # noqa: B010 (read by grng_jax.save / load)
        setattr(fn, "grng_fallback", fallback)  # noqa: B010
        setattr(fn, "grng_layers", layers)  # noqa: B010 (read by grng_jax.describe)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_float_leaves(name: str, params) -> None:
    """Refuse a params leaf that is not real floating point naming its path (the core names
    only its position): an integer buffer an equinox model keeps (position ids) is not a
    parameter; eqx.partition(model, eqx.is_inexact_array) leaves it out."""
    for path, x in zip(leaf_paths(params), jax.tree_util.tree_leaves(params)):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
            where = "/".join(str(k) for k in path) or "<root>"
            raise TypeError(
                f"grng_jax.{name}: params leaf {where!r} has dtype {dtype}: GRNG optimizes "
                "real floating-point parameters only. Keep other arrays out of the params it "
                "is given (equinox: eqx.partition(model, eqx.is_inexact_array), not "
                "eqx.is_array; flax: a separate collection), or mask them (optax.masked)")


def _check_vma(name: str, axis_name, batch) -> None:
    """Refuse shard_map's default check_vma=True: there jax.grad sums the gradients of
    replicated parameters over the devices, so the optimizer would get a sum where it
    averages (silently off by the device count). Seen from the batch: its leaves vary along
    `axis_name` only when varying-axis types are tracked."""
    if axis_name is None or batch is None or not hasattr(jax, "typeof"):
        return
    names = set(axis_name) if isinstance(axis_name, (tuple, list)) else {axis_name}
    for x in jax.tree_util.tree_leaves(batch):
        aval = jax.typeof(x)  # the varying axes: `.vma` (JAX 0.6-0.9), `.mat.varying` (0.10)
        vma = getattr(aval, "vma", None) or getattr(getattr(aval, "mat", None), "varying",
                                                    None) or ()
        if names & set(vma):
            raise ValueError(
                f"grng_jax.{name}(axis_name={axis_name!r}) runs under jax.shard_map with "
                "check_vma=True (the default): there jax.grad sums the gradients of replicated "
                "parameters over the devices, and the optimizer, which averages gradients and "
                "statistics over axis_name itself, would be off by the device count. Use "
                "jax.shard_map(..., check_vma=False)")


def _setup(core_main: gc.Optimizer, params, opts: _Options, state=None):
    """(core optimizer, K-FAC layer specs or None, [(LayerRef, why)] of the layers over
    `max_factor_dim`) for this params pytree: the core's `resolve` picks the fallback
    structure of a kfac optimizer whose model has no layer. With the GRNGState `state` (an
    update), its K-FAC layers are the ones: the limit was applied when it was built."""
    specs: list = []
    oversized: list = []
    if core_main.config.structure == "kfac":
        specs = resolve_layers(params, opts.layers)
        if state is None:
            specs, oversized = fitting_layers(core_main, params, specs)
        else:
            built = {L.layout.weight for L in getattr(state.core.curvature, "kfac", None) or ()}
            specs = [r for r in specs if r.weight in built]
    core = core_main.resolve(specs, opts.fallback)
    return core, (specs if core.config.structure == "kfac" else None), oversized


def layer_specs(specs) -> list[gc.LayerSpec]:
    """The core's LayerSpecs of grng_jax LayerRefs."""
    return [gc.LayerSpec(r.weight, r.bias, r.transposed, a_diagonal=r.embed, in_axes=r.in_axes)
            for r in specs]


def fitting_layers(core: gc.Optimizer, params, specs) -> tuple[list, list]:
    """(the LayerRefs whose factors fit `max_factor_dim`, [(LayerRef, why not)] of the others;
    ALGORITHMS.md §2.1): from shapes only, so alike under jit."""
    why = core.too_large(jax.tree_util.tree_leaves(params), layer_specs(specs))
    return ([r for r, w in zip(specs, why) if w is None],
            [(r, w) for r, w in zip(specs, why) if w is not None])


def _init(core: gc.Optimizer, specs, params, seed: int) -> GRNGState:
    leaves = jax.tree_util.tree_leaves(params)
    lspecs = None if specs is None else layer_specs(specs)

    # Under jit the state's arrays are placed (committed or not) like the params: a state
    # committed to a device beside uncommitted params would make the second train step
    # compile again.
    @jax.jit
    def build(leaves):
        return GRNGState(core=core.init(leaves, layers=lspecs), key=jax.random.PRNGKey(seed))

    return build(leaves)


def _check_needs(core: gc.Optimizer, specs, opts: _Options, given: _Batch, params) -> None:
    """What the update needs of `loss_fn` and `batch`, and a loss_fn that returns one scalar
    (checked abstractly, `jax.eval_shape`, while the update is traced)."""
    req = core.requirements
    need = (("per-example gradients", req.per_example_grads),
            ("K-FAC layer statistics", bool(specs)),
            ("gradients at other parameters (finite differences)", req.grad_fn),
            ("Hessian-vector products (double backprop)", req.hvp_fn))
    what = [w for w, on in need if on]
    if what and (given.loss_fn is None or given.batch is None):
        raise ValueError(
            f"grng_jax.{opts.name} (structure={core.config.structure!r}) needs "
            f"{', '.join(what)}: pass loss_fn=(params, batch) -> mean loss and batch= to "
            "update (flax.nnx: loss_fn=grng_jax.nnx_loss_fn(model, loss); or pick "
            "structure='diagonal' and rho=0 / gr-free settings)")
    if what and given.loss_fn is not None:
        if specs or req.per_example_grads:  # paths that read the batch size anyway:
            batch_size(given.batch)  # mixed leading sizes named before the loss runs
        out = jax.eval_shape(given.loss_fn, params, given.batch)
        if not (hasattr(out, "shape") and out.shape == ()):
            got = (f"a {type(out).__name__}" if not hasattr(out, "shape")
                   else f"an array of shape {out.shape}")
            raise ValueError(
                f"grng_jax.{opts.name}: loss_fn must return the batch's mean loss as one "
                f"scalar; it returned {got}. A loss with auxiliary outputs (has_aux): pass "
                "loss_fn=lambda p, b: f(p, b)[0]")


def _mc_key(req: gc.Requirements, need_stats: bool, state_key, opts: _Options, given: _Batch):
    """(new state key, key of this step's sampled labels or None) for fisher="mc"."""
    if req.fisher != "mc" or not need_stats:
        return state_key, None
    if given.mc_loss_fn is None:
        raise ValueError(
            f"grng_jax.{opts.name}(fisher='mc') needs mc_loss_fn=(params, batch, key) -> the "
            "mean loss with labels sampled from the model (see "
            "grng_jax.mc_softmax_cross_entropy)")
    new_key, sub = state_key, given.key
    if sub is None:
        new_key, sub = jax.random.split(state_key)
    if opts.axis_name is not None:
        sub = jax.random.fold_in(sub, lax.axis_index(opts.axis_name))
    return new_key, sub


def _update(core: gc.Optimizer, specs, opts: _Options, updates, state: GRNGState, params,
            given: _Batch):
    req = core.requirements
    leaves, treedef_ = jax.tree_util.tree_flatten(params)
    treedef: Any = treedef_
    grads = _collect.pmean(treedef.flatten_up_to(updates), opts.axis_name)
    _check_needs(core, specs, opts, given, params)
    need_stats = req.per_example_grads or bool(specs)
    new_key, sub = _mc_key(req, need_stats, state.key, opts, given)
    stat_loss: Any = given.mc_loss_fn if req.fisher == "mc" else given.loss_fn
    if req.per_example_grads and stat_loss is not None:
        _refuse_batch_coupled(opts.name, core, stat_loss if req.fisher != "mc" else (
            lambda p, b: stat_loss(p, b, jax.random.PRNGKey(0))), params, given.batch)
    oracle = None
    if req.grad_fn or req.hvp_fn:
        oracle = _collect.oracle(cast(Callable, given.loss_fn), treedef, given.batch,
                                 opts.axis_name, req.grad_fn, req.hvp_fn)
    coll = _collect.collective(opts.axis_name)

    def stats():
        pe = layer_list = None
        if req.per_example_grads:
            pe = _collect.per_example_grads(stat_loss, treedef, leaves, given.batch, sub)
        if specs:
            layer_list = _collect.layer_stats(stat_loss, treedef, leaves, given.batch, specs,
                                              params, sub)
        return gc.Stats(per_example_grads=pe, layers=layer_list)

    # the oracle's passes (ĝ) do not depend on the refresh flags: run them once, outside the
    # lax.switch, where XLA:CPU runs convolution gradients several times faster
    hoisted = (hoisted_oracle.hoist(core, grads, state.core, leaves, oracle, coll)
               if opts.refresh == "switch" else None)

    # the first step's gradient check (`_explained`): not across replicas (their averaged
    # gradient is no replica's rows'), not of a mean over micro-batches, not under vmap (a
    # cond there runs both branches: the check would run on every step)
    check = opts.axis_name is None and not given.accumulated and not _nested.in_vmap()

    def step(curvature, inverse, steady=None):
        st = stats() if need_stats and curvature is not False else None
        if st is not None and check:
            check_first_step(opts.name, core, grads, state.core, leaves, st, params)
        ups, new = core.update(grads, state.core, leaves, stats=st,
                               oracle=oracle if hoisted is None else hoisted.replay(),
                               collective=coll, curvature=curvature, inverse=inverse,
                               steady=steady)
        return list(ups), new

    # the schedule counts calls (taken + skipped), as grng_core and the other adapters do
    ups, new_core = _refresh(step, core, opts.refresh, state.core.step + state.core.skipped)
    _report_skip(opts.name, state.core, new_core)
    return treedef.unflatten(ups), GRNGState(core=new_core, key=new_key)


def _refuse_batch_coupled(name: str, core: gc.Optimizer, loss_fn, params, batch) -> None:
    """Per-example gradients are the loss's on one-example batches: a layer that mixes the
    batch's examples (BatchNorm in training mode) makes them another function's (a
    one-example BatchNorm outputs its bias: zero gradients before it). Refused while the
    update is traced, before anything changes, as grng_torch refuses it before its vmap."""
    coupled = batch_coupled(loss_fn, params, batch)
    if coupled:
        h = core.config
        raise ValueError(
            f"grng_jax.{name} with structure={h.structure!r}, fisher={h.fisher!r} needs "
            f"per-example gradients, which {', '.join(dict.fromkeys(coupled))} in training "
            "mode does not have (its output for one example depends on the batch's others). "
            "Use structure='kfac' (the default; it needs no per-example gradients), or "
            "evaluate the loss with the running averages (use_running_average=True)")


def _warn_skip(name, now, step, skipped) -> None:
    """The host side of the skip report; under vmap the values may be batched (and a
    lax.cond becomes a select, so the callback also runs for runs that were not skipped)."""
    import warnings

    import numpy as np

    now, step, skipped = np.asarray(now), np.asarray(step), np.asarray(skipped)
    if not now.any():
        return
    where = "" if now.ndim == 0 else f" ({int(now.sum())} of {now.size} vmapped runs)"
    call = int(np.max(step + skipped))
    warnings.warn(f"grng_jax.{name}: call {call} was skipped{where} (non-finite gradients, "
                  f"statistics or update; parameters and state unchanged); "
                  f"{int(np.max(skipped))} skipped so far", RuntimeWarning,
                  stacklevel=user_stacklevel())


def _report_skip(name: str, old: gc.OptState, new: gc.OptState) -> None:
    """Warn from inside jit when this step was skipped (`jax.debug.callback` under a
    `lax.cond`: nothing runs on a step that was taken). Eager steps warn in the core."""
    skipped_now = new.skipped > old.skipped
    if not isinstance(skipped_now, jax.core.Tracer):
        return
    lax.cond(skipped_now,
             lambda: jax.debug.callback(partial(_warn_skip, name), skipped_now, new.step,
                                        new.skipped),
             lambda: None)


def _refresh(step: Callable, core: gc.Optimizer, refresh: str, count):
    """Run `step(curvature, inverse, steady)`: "where" leaves the flags to the core (both
    branches computed, selected in-graph); "switch" runs, by ``lax.switch``, only the branch
    of the flag pair that `grng_core.schedule.flag_table` gives this step. The warm-up
    refreshes both (step 0's pair), with the other layers on the pair of the schedule without
    it (`steady`, where `grng_core.schedule.steady_flags` has them): one more branch per pair."""
    if refresh == "where":
        return step(None, None)
    pairs, index = flag_table(core.config)
    if len(pairs) == 1:
        return step(*pairs[0])
    branches = [lambda p=p: step(*p) for p in pairs]
    which = jnp.asarray(index, jnp.int32)[count % len(index)]
    warm = warmup_steps(core.config)
    if warm and core.steady_flags(0) is not None:  # per-layer warm-up: (both, steady=pair)
        both = pairs[index[0]]
        extra = {p: len(pairs) + k for k, p in enumerate(q for q in pairs if q != both)}
        branches += [lambda p=p: step(*both, steady=p) for p in extra]
        during = [extra.get(pairs[i], index[0]) for i in index]
        which = jnp.where(count < warm, jnp.asarray(during, jnp.int32)[count % len(index)],
                          which)
    elif warm:  # the warm-up refreshes both: step 0's pair
        which = jnp.where(count < warm, index[0], which)
    if not isinstance(which, jax.core.Tracer):
        # an eager update: the branch is picked here, so that the core sees concrete values
        # (a non-finite step warns, or raises with on_nonfinite="raise", at once)
        return branches[int(which)]()
    return lax.switch(which, branches)


def mc_softmax_cross_entropy(logits_fn: Callable[[Any, Any], Any]) -> Callable:
    """An ``mc_loss_fn`` for classifiers (fisher="mc"): labels drawn from
    softmax(logits_fn(params, batch)) (no gradient through the draw), then the mean softmax
    cross-entropy against them."""

    def mc_loss_fn(params, batch, key):
        logits = logits_fn(params, batch)
        labels = jax.random.categorical(key, lax.stop_gradient(logits), axis=-1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return mc_loss_fn


def mc_squared_error(predict_fn: Callable[[Any, Any], Any]) -> Callable:
    """An ``mc_loss_fn`` for ``0.5 * ||f - y||²`` regression (fisher="mc"): targets drawn from
    N(f(params, batch), I), then the mean of 0.5 * ||f - y||² over the batch."""

    def mc_loss_fn(params, batch, key):
        f = predict_fn(params, batch)
        y = lax.stop_gradient(f + jax.random.normal(key, f.shape, f.dtype))
        r = (f - y).reshape(f.shape[0], -1)
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))

    return mc_loss_fn
