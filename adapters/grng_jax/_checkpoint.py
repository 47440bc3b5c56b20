"""Portable checkpoints of a grng_jax optimizer: ``save(path, opt, state)``, ``load(path, opt,
like)``.

The file is grng_core's framework-neutral ``.npz`` (``grng_core.save_state``: no pickle,
atomic write, format version), with the core optimizer's name and hyperparameters, checked on
load: a file written by another optimizer, or the same one with other hyperparameters, is a
ValueError. Any pytree checkpointer (orbax, flax.serialization, ...) also saves the state as
it is, without that check.

``state`` may be the :class:`GRNGState` itself or any optax state holding exactly one (the
tuple of an ``optax.chain``, a ``multi_transform`` state, ...):

- the core state is the file's state, in grng_core's portable layout, when nothing else in
  ``state`` holds an array (a bare GRNGState, a chain with clipping or weight decay): the file
  is then read by every backend (``grng_core.load_state(path, like=core_state, opt=core)``);
- otherwise the file's state is ``{"grng": <the portable core state>, "optax": [every other
  array of state, in pytree-flatten order]}`` and ``extra["layout"]`` is ``"optax"``; other
  backends read the core state as ``grng_core.load_state(path)["grng"]``. Those other entries
  must be arrays (jax or NumPy): ``load`` restores them into the template's pytree.

A file holding only a core state (e.g. written by the torch or CuPy adapter) loads into any
template: the template's other entries are then kept as they are. The PRNG key of fisher="mc"
and the host step count go into the metadata's ``extra`` (other backends ignore them).

``opt`` is the grng_jax transformation, an optax combinator over exactly one of them (found by
walking its functions: ``optax.chain``, ``named_chain``, ``multi_transform``), or the
``grng_core.Optimizer`` to record and check. ``optax.inject_hyperparams`` builds its
transformation anew on every call: pass the grng_jax transformation built with the same
arguments instead.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import array_api_compat
import jax
import numpy as np

import grng_core as gc
from grng_core import codec
from grng_core.npz_tree import place
from grng_core.state import host_step, kfac_layers
from grng_jax._optax import GRNGState

ADAPTER = "grng_jax"
_DEPTH = 12


def _is_grng(x) -> bool:
    return isinstance(x, GRNGState)


def _split(state, what: str):
    """(the GRNGState in `state`, the other leaves with their paths, how to put it back)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_grng)
    where = [i for i, (_, x) in enumerate(flat) if _is_grng(x)]
    if len(where) != 1:
        raise TypeError(f"{what} must hold exactly one GRNGState (the state of a grng_jax "
                        f"optimizer, alone or inside an optax chain), found {len(where)}")
    i = where[0]
    others = [(jax.tree_util.keystr(p), x) for k, (p, x) in enumerate(flat) if k != i]
    return flat[i][1], others, (treedef, i)


def _join(grng: GRNGState, others: list, how) -> object:
    treedef, i = how
    leaves = list(others)
    leaves.insert(i, grng)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _tagged(obj, seen: set, depth: int = 0) -> list:
    """The functions carrying ``grng_core`` reachable from `obj` through containers, closures
    (an optax combinator keeps its transformations' functions in its closures) and optax's
    class-based wrappers (optax.MultiSteps keeps its inner transformation as an attribute)."""
    if depth > _DEPTH or id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (tuple, list)):
        return [f for x in obj for f in _tagged(x, seen, depth + 1)]
    if isinstance(obj, dict):
        return [f for x in obj.values() for f in _tagged(x, seen, depth + 1)]
    if isinstance(obj, types.MethodType):  # optax.MultiSteps(...).gradient_transformation()
        return _tagged(obj.__self__, seen, depth + 1)
    if type(obj).__module__.startswith("optax.") and hasattr(obj, "__dict__"):  # MultiSteps
        return [f for x in vars(obj).values() for f in _tagged(x, seen, depth + 1)]
    if not isinstance(obj, types.FunctionType):
        return []
    if getattr(obj, "grng_core", None) is not None:
        return [obj]
    out = []
    for cell in obj.__closure__ or ():
        try:
            out += _tagged(cell.cell_contents, seen, depth + 1)
        except ValueError:  # an empty cell
            continue
    return out


def core_of(opt, grng: GRNGState) -> gc.Optimizer:
    """The core optimizer whose hyperparameters a checkpoint records, resolved like the
    adapter resolved it for `grng`'s params (a kfac optimizer without layers: the fallback)."""
    if isinstance(opt, gc.Optimizer):
        return opt
    found = {id(f.grng_core): f for f in _tagged(opt, set())}
    if len(found) != 1:
        raise TypeError(
            "opt must be the grng_jax transformation (grng_jax.ring(...), ...), an optax "
            "combinator of exactly one, or a grng_core.Optimizer; found "
            f"{len(found)} grng_jax transformations in {type(opt).__name__}. For "
            "optax.inject_hyperparams pass the grng_jax transformation built with the same "
            "arguments")
    fn = next(iter(found.values()))
    return fn.grng_core.resolve(kfac_layers(grng.core), fn.grng_fallback)


def save(path, opt, state, *, extra: dict | None = None) -> None:
    """Write `state` (a GRNGState, or an optax state holding one) to `path` atomically, with
    `opt`'s core name and hyperparameters (checked by :func:`load`). `extra`: a JSON-able dict
    kept in the metadata (``grng_core.read_metadata(path)["extra"]``; the keys ``adapter``,
    ``layout``, ``key`` and ``host_step`` are the adapter's)."""
    grng, others, _ = _split(state, "state")
    core = core_of(opt, grng)
    for where, x in others:
        if not array_api_compat.is_array_api_obj(x):
            raise TypeError(f"state{where} is a {type(x).__name__}: grng_jax.save stores the "
                            "arrays of an optax state, nothing else")
    key = [int(k) for k in np.asarray(jax.device_get(grng.key)).ravel()]
    info = {"adapter": ADAPTER, "layout": "optax" if others else "core", "key": key,
            "host_step": host_step(grng.core) if np.ndim(grng.core.step) == 0 else None}
    tree = grng.core
    if others:
        tree = {"grng": codec.encode(grng.core), "optax": [x for _, x in others]}
    gc.save_state(path, tree, opt=core, extra={**(extra or {}), **info})


def load(path, opt, like, *, allow_changed: Sequence[str] = ()):
    """The state saved at `path`, as jax arrays placed, shaped and typed like the template
    `like` (``opt.init(params)``, the same kind of state that was saved). ValueError when the
    file does not match the template or `opt`'s name and hyperparameters, but those named in
    `allow_changed` (``("learning_rate",)``: resume with another learning rate or schedule);
    `like` is never modified."""
    grng_like, others_like, how = _split(like, "like")
    core = core_of(opt, grng_like)
    extra = gc.read_metadata(path).get("extra") or {}
    others = [x for _, x in others_like]
    allowed, spelled = tuple(allow_changed), {"lr": "learning_rate"}  # optax's spelling
    if extra.get("layout") == "optax":
        template = {"grng": codec.encode(grng_like.core), "optax": others}
        tree = gc.load_state(path, like=template, opt=core, allow_changed=allowed,
                             spelled=spelled)
        core_state, others = codec.decode(tree["grng"], like=grng_like.core), tree["optax"]
    else:
        core_state = gc.load_state(path, like=grng_like.core, opt=core,
                                   allow_changed=allowed, spelled=spelled)
    key = grng_like.key
    saved = extra.get("key")
    if isinstance(saved, list) and len(saved) == key.size:
        key = place(np.asarray(saved, dtype=np.uint32).reshape(key.shape), key)
    return _join(GRNGState(core=core_state, key=key), others, how)
