"""RENG, RING and R-Kalman as optax gradient transformations over grng_core.

The adapter flattens the params pytree into a list of leaves, collects what the core needs
from ``loss_fn`` and ``batch`` with JAX's transformations (grad, vmap, jvp, the perturbation
pass of grng_jax._tags), calls the core's pure ``update`` and rebuilds the pytree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

import grng_core as gc
from grng_jax import _collect
from grng_jax._layers import resolve_layers

REFRESH = ("switch", "where")
FALLBACKS = ("diagonal", "woodbury")


class GRNGState(NamedTuple):
    """Optimizer state: a pytree of arrays.

    core: the grng_core state (dict of arrays; ``core["step"]`` counts the steps taken).
    key: a raw PRNG key (uint32[2]) for the labels sampled by ``fisher="mc"``.
    """

    core: dict
    key: jax.Array


_TRACER = getattr(jax.core, "Tracer", None)


def _is_tracer(x) -> bool:
    if _TRACER is not None:
        return isinstance(x, _TRACER)
    try:  # pragma: no cover - a JAX without jax.core.Tracer
        float(x)
        return False
    except Exception:
        return hasattr(x, "aval")


def _concrete_number(name: str, v, integer: bool = False):
    """A Python number from a Python number or a concrete 0-d array (optax.inject_hyperparams
    hands jax arrays to the factory); a traced value of a static hyperparameter is an error."""
    if v is None or isinstance(v, (bool, str)) or callable(v):
        return v
    if isinstance(v, (int, float)):
        return v
    if _is_tracer(v):
        raise ValueError(
            f"{name} is a traced value: grng_core needs it as a Python number when the optimizer "
            "is built. Only learning_rate, rho and damping may be injected or scheduled; with "
            f"optax.inject_hyperparams pass static_args=({name!r}, ...) for the others")
    arr = jnp.asarray(v)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    return int(arr) if integer or jnp.issubdtype(arr.dtype, jnp.integer) else float(arr)


def _schedulable(name: str, v):
    """learning_rate, rho, damping: a number, an optax-style schedule (called with the count of
    updates already applied, 0 on the first; the core calls schedules with the 1-based step t),
    or a traced value (optax.inject_hyperparams under jit), given to the core as a constant
    schedule."""
    if callable(v):
        return lambda t, _f=v: _f(t - 1)
    if _is_tracer(v):
        return lambda t, _v=v: _v
    return _concrete_number(name, v)


_INT_ARGS = ("curvature_every", "inverse_every", "ns_max_iter")


def _core_kwargs(kwargs: dict) -> dict:
    """The core's keyword arguments: None keeps the core's default."""
    out = {}
    for k, v in kwargs.items():
        if v is None:
            continue
        if k in ("lr", "rho", "damping"):
            out[k] = _schedulable(k, v)
        else:
            out[k] = _concrete_number(k, v, integer=k in _INT_ARGS)
    return out


def _flag_table(core: gc.Optimizer):
    """The distinct (curvature, inverse) refresh flags and, per step of one period, which one
    applies; None when the flags are not periodic in the step (then they are decided in-graph).

    Only K-FAC keeps inverses: for the other structures the inverse flag is left to the core
    (None, an unused in-graph flag), so that inverse_every does not double the traced branches.
    """
    h = core.hyperparams
    kfac = h["structure"] == "kfac"
    period = int(h.get("curvature_every", 1))
    if kfac:
        period = math.lcm(period, int(h.get("inverse_every", 1)))
    flags = [core.refresh_flags(t) for t in range(1, 2 * period + 1)]
    if not kfac:
        flags = [(c, None) for c, _ in flags]
    if flags[:period] != flags[period:]:
        return None
    combos = list(dict.fromkeys(flags[:period]))
    return combos, [combos.index(f) for f in flags[:period]]


def _transform(name: str, factory: Callable, kwargs: dict, *, axis_name, layers, refresh,
               fallback, seed) -> optax.GradientTransformationExtraArgs:
    if refresh not in REFRESH:
        raise ValueError(f"invalid refresh={refresh!r}: allowed 'switch' or 'where'")
    if fallback not in FALLBACKS:
        raise ValueError(f"invalid fallback={fallback!r}: allowed 'diagonal' or 'woodbury'")
    seed = 0 if seed is None else _concrete_number("seed", seed, integer=True)
    ckw = _core_kwargs(kwargs)
    core_main = factory(**ckw)  # validates every hyperparameter now
    structure = core_main.hyperparams["structure"]
    core_fallback = factory(**{**ckw, "structure": fallback}) if structure == "kfac" else None

    def setup(params):
        """(core optimizer, K-FAC layer specs) for this params pytree: a kfac optimizer whose
        model exposes no dense layer falls back to the `fallback` structure."""
        if structure != "kfac":
            return core_main, None
        specs = resolve_layers(params, layers)
        if not specs:
            return core_fallback, None
        return core_main, specs

    def init_fn(params):
        core, specs = setup(params)
        leaves = jax.tree_util.tree_leaves(params)
        lspecs = None if specs is None else [gc.LayerSpec(w, b, True) for w, b in specs]

        # Under jit the state's arrays are placed (committed or not) like the params: a state
        # committed to a device beside uncommitted params would make the second train step
        # compile again.
        @jax.jit
        def build(leaves):
            return GRNGState(core=core.init(leaves, layers=lspecs),
                             key=jax.random.PRNGKey(seed))

        return build(leaves)

    def update_fn(updates, state, params=None, *, loss_fn=None, batch=None, mc_loss_fn=None,
                  key=None, **extra_args):
        del extra_args  # arguments meant for other transformations of an optax.chain
        if params is None:
            raise ValueError(f"grng_jax.{name} needs params: opt.update(grads, state, params, "
                             "loss_fn=..., batch=...)")
        if not isinstance(state, GRNGState):
            raise TypeError(f"state must be the GRNGState returned by grng_jax.{name}(...).init")
        core, specs = setup(params)
        req = core.requirements
        leaves, treedef = jax.tree_util.tree_flatten(params)
        grads = treedef.flatten_up_to(updates)
        grads = _collect.pmean(grads, axis_name)

        need_stats = req.per_example_grads or bool(specs)
        need_oracle = req.grad_fn or req.hvp_fn
        if (need_stats or need_oracle) and (loss_fn is None or batch is None):
            what = [w for w, on in (("per-example gradients", req.per_example_grads),
                                    ("K-FAC layer statistics", bool(specs)),
                                    ("gradients at other parameters (finite differences)",
                                     req.grad_fn),
                                    ("Hessian-vector products (double backprop)", req.hvp_fn))
                    if on]
            raise ValueError(
                f"grng_jax.{name} (structure={core.hyperparams['structure']!r}) needs "
                f"{', '.join(what)}: pass loss_fn=(params, batch) -> mean loss and batch= to "
                "update (or pick structure='diagonal' and rho=0 / gr-free settings)")

        mc = req.fisher == "mc"
        new_key, sub = state.key, None
        if mc and need_stats:
            if mc_loss_fn is None:
                raise ValueError(
                    f"grng_jax.{name}(fisher='mc') needs mc_loss_fn=(params, batch, key) -> the "
                    "mean loss with labels sampled from the model (see "
                    "grng_jax.mc_softmax_cross_entropy)")
            if key is None:
                new_key, sub = jax.random.split(state.key)
            else:
                sub = key
            if axis_name is not None:
                sub = jax.random.fold_in(sub, lax.axis_index(axis_name))
        stat_loss = mc_loss_fn if mc else loss_fn
        oracle = None
        if need_oracle:
            oracle = _collect.oracle(loss_fn, treedef, batch, axis_name, req.grad_fn,
                                     req.hvp_fn)
        coll = _collect.collective(axis_name)

        def stats():
            pe = layer_list = None
            if req.per_example_grads:
                pe = _collect.per_example_grads(stat_loss, treedef, leaves, batch, sub)
            if specs:
                layer_list = _collect.layer_stats(stat_loss, treedef, leaves, batch, specs,
                                                  params, sub)
            return gc.Stats(per_example_grads=pe, layers=layer_list)

        def step(curvature, inverse):
            st = stats() if need_stats and curvature is not False else None
            ups, new = core.update(grads, state.core, leaves, stats=st, oracle=oracle,
                                   collective=coll, curvature=curvature, inverse=inverse)
            return list(ups), new

        table = None if refresh == "where" else _flag_table(core)
        if table is None:
            ups, new_core = step(None, None)
        elif len(table[0]) == 1:
            ups, new_core = step(*table[0][0])
        else:
            combos, index = table
            period = len(index)
            which = jnp.asarray(index, jnp.int32)[state.core["step"] % period]
            ups, new_core = lax.switch(which, [lambda c=c: step(*c) for c in combos])
        return treedef.unflatten(ups), GRNGState(core=new_core, key=new_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _doc_common() -> str:
    return """
    Adapter options (not passed to the core):
      axis_name: a pmap / shard_map axis name: gradients, oracle results and curvature
        statistics are averaged (per-example rows gathered) over it. None: one device.
      layers: which params leaves form K-FAC dense layers (structure "kfac"): "auto" (2-D
        leaves named ``kernel`` with their sibling ``bias``: flax.linen.Dense and
        grng_jax.init_dense), a sequence of grng_jax.Layer, a callable params -> sequence, or
        None. Leaves outside the layers use the diagonal.
      fallback: the structure used instead of "kfac" when the model has no layer at all:
        "diagonal" (default; no per-example gradients) or "woodbury" (the batch's exact
        empirical Fisher, any model; needs loss_fn and batch).
      refresh: "switch" (default) runs only the refresh branch the step needs (lax.switch over
        the (curvature, inverse) flag pairs of the period), "where" lets the core compute both
        branches and select in-graph (use it under vmap of the optimizer).
      seed: seeds the PRNG key kept in the state for fisher="mc".

    update(grads, state, params, *, loss_fn=None, batch=None, mc_loss_fn=None, key=None):
      loss_fn(params, batch) -> the mean loss over the batch's leading axis; batch: a pytree
        of arrays that all have the leading batch axis. Needed whenever the optimizer needs
        per-example gradients (woodbury), K-FAC statistics (kfac), or an oracle (rho != 0
        with RENG / R-Kalman). mc_loss_fn(params, batch, key): the loss with labels sampled
        from the model, for fisher="mc". key: overrides the state's key for that sampling.
    """


def reng(learning_rate=None, rho=None, damping=None, *, structure=None, gr=None,
         fd_scheme=None, fd_radius=None, fisher=None, momentum=None, weight_decay=None,
         ema_decay=None, curvature_every=None, inverse_every=None, ns_tol=None,
         ns_max_iter=None, inverse_method=None, kl_clip=None, state_dtype=None,
         on_nonfinite=None, axis_name=None, layers="auto", refresh="switch",
         fallback="diagonal", seed=None) -> optax.GradientTransformationExtraArgs:
    """RENG (d = (F + λI)⁻¹ ĝ) as an optax transformation; None keeps grng_core.reng's default.

    learning_rate, rho and damping take numbers or optax schedules (called with the update
    count, 0 first). The other hyperparameters are grng_core.reng's (see docs/CORE_API.md).
    """
    kw = dict(lr=learning_rate, rho=rho, damping=damping, structure=structure, gr=gr,
              fd_scheme=fd_scheme, fd_radius=fd_radius, fisher=fisher, momentum=momentum,
              weight_decay=weight_decay, ema_decay=ema_decay, curvature_every=curvature_every,
              inverse_every=inverse_every, ns_tol=ns_tol, ns_max_iter=ns_max_iter,
              inverse_method=inverse_method, kl_clip=kl_clip, state_dtype=state_dtype,
              on_nonfinite=on_nonfinite)
    return _transform("reng", gc.reng, kw, axis_name=axis_name, layers=layers, refresh=refresh,
                      fallback=fallback, seed=seed)


def ring(learning_rate=None, rho=None, damping=None, *, structure=None, fisher=None,
         momentum=None, weight_decay=None, ema_decay=None, curvature_every=None,
         inverse_every=None, ns_tol=None, ns_max_iter=None, inverse_method=None, kl_clip=None,
         state_dtype=None, on_nonfinite=None, axis_name=None, layers="auto", refresh="switch",
         fallback="diagonal", seed=None) -> optax.GradientTransformationExtraArgs:
    """RING (d = (1 − ρλ)(F + λI)⁻¹ g + ρ g) as an optax transformation; None keeps
    grng_core.ring's default. RING needs no oracle: loss_fn and batch only feed the curvature.
    """
    kw = dict(lr=learning_rate, rho=rho, damping=damping, structure=structure, fisher=fisher,
              momentum=momentum, weight_decay=weight_decay, ema_decay=ema_decay,
              curvature_every=curvature_every, inverse_every=inverse_every, ns_tol=ns_tol,
              ns_max_iter=ns_max_iter, inverse_method=inverse_method, kl_clip=kl_clip,
              state_dtype=state_dtype, on_nonfinite=on_nonfinite)
    return _transform("ring", gc.ring, kw, axis_name=axis_name, layers=layers, refresh=refresh,
                      fallback=fallback, seed=seed)


def rkalman(learning_rate=None, rho=None, *, structure=None, gr=None, fd_scheme=None,
            fd_radius=None, kalman_decay=None, prior_var=None, damping=None, fisher=None,
            momentum=None, weight_decay=None, ema_decay=None, curvature_every=None,
            inverse_every=None, ns_tol=None, ns_max_iter=None, inverse_method=None,
            kl_clip=None, state_dtype=None, on_nonfinite=None, axis_name=None, layers="auto",
            refresh="switch", fallback="diagonal",
            seed=None) -> optax.GradientTransformationExtraArgs:
    """R-Kalman (a Kalman filter over the parameters, the mean moving along P⁺ ĝ) as an optax
    transformation; None keeps grng_core.rkalman's default (structure "woodbury")."""
    kw = dict(lr=learning_rate, rho=rho, structure=structure, gr=gr, fd_scheme=fd_scheme,
              fd_radius=fd_radius, kalman_decay=kalman_decay, prior_var=prior_var,
              damping=damping, fisher=fisher, momentum=momentum, weight_decay=weight_decay,
              ema_decay=ema_decay, curvature_every=curvature_every,
              inverse_every=inverse_every, ns_tol=ns_tol, ns_max_iter=ns_max_iter,
              inverse_method=inverse_method, kl_clip=kl_clip, state_dtype=state_dtype,
              on_nonfinite=on_nonfinite)
    return _transform("rkalman", gc.rkalman, kw, axis_name=axis_name, layers=layers,
                      refresh=refresh, fallback=fallback, seed=seed)


for _f in (reng, ring, rkalman):
    _f.__doc__ = (_f.__doc__ or "") + _doc_common()


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
