"""Which params leaves form K-FAC dense layers: found by name, given, or traced from the loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from grng_jax._tags import Collector, collecting


class Layer(NamedTuple):
    """One dense layer of a params pytree: the paths of its kernel (d_in, d_out) and bias.

    A path is a tuple of plain keys (``("Dense_0", "kernel")``), a ``"/"``-joined string
    (``"Dense_0/kernel"``) or a ``jax.tree_util.keystr`` string (``"['Dense_0']['kernel']"``).
    """

    weight: Any
    bias: Any = None


def _plain(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def leaf_paths(params) -> list[tuple]:
    """The path of every leaf, as a tuple of plain keys, in ``tree_flatten`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [tuple(_plain(e) for e in path) for path, _ in flat]


def _keystrs(params) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path) for path, _ in flat]


def describe(params, index: int) -> str:
    """A readable name of leaf `index`."""
    return "/".join(str(k) for k in leaf_paths(params)[index]) or "<root>"


def _index(params, path, what: str) -> int:
    paths = leaf_paths(params)
    if isinstance(path, str):
        if path in (ks := _keystrs(params)):
            return ks.index(path)
        parts = tuple(p for p in path.split("/") if p)
        for i, p in enumerate(paths):
            if tuple(str(k) for k in p) == parts:
                return i
    else:
        want = tuple(path) if isinstance(path, (tuple, list)) else (path,)
        if want in paths:
            return paths.index(want)
        want_s = tuple(str(k) for k in want)
        for i, p in enumerate(paths):
            if tuple(str(k) for k in p) == want_s:
                return i
    names = ", ".join("/".join(str(k) for k in p) for p in paths)
    raise ValueError(f"layers: no params leaf at {what} path {path!r}; the leaves are: {names}")


def auto_layers(params) -> list[tuple[int, int | None]]:
    """Dense layers by name: a 2-D leaf named ``kernel`` (Flax layout, (d_in, d_out)), with a
    1-D sibling ``bias`` of size d_out when there is one (``flax.linen.Dense``, :func:`init_dense`).
    """
    leaves = jax.tree_util.tree_leaves(params)
    paths = leaf_paths(params)
    where = {p: i for i, p in enumerate(paths)}
    out = []
    for i, (p, x) in enumerate(zip(paths, leaves)):
        if not p or p[-1] != "kernel" or getattr(x, "ndim", 0) != 2:
            continue
        b = where.get(p[:-1] + ("bias",))
        if b is not None and not (leaves[b].ndim == 1 and leaves[b].shape[0] == x.shape[1]):
            b = None
        out.append((i, b))
    return out


def resolve_layers(params, layers) -> list[tuple[int, int | None]]:
    """Leaf indices (weight, bias) of the K-FAC layers, from the optimizer's ``layers`` option.

    "auto": by name (:func:`auto_layers`); None or []: no layers (every leaf diagonal); a
    sequence of :class:`Layer` (or bare kernel paths, for layers without bias); or a callable
    ``params -> such a sequence``.
    """
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"invalid layers={layers!r}: allowed 'auto', None, a sequence of "
                             "grng_jax.Layer, or a callable params -> sequence")
        return auto_layers(params)
    if layers is None:
        return []
    if callable(layers):
        layers = layers(params)
    leaves = jax.tree_util.tree_leaves(params)
    out, seen = [], set()
    for entry in layers:
        w_path, b_path = (entry.weight, entry.bias) if isinstance(entry, Layer) else (entry, None)
        w = _index(params, w_path, "weight")
        if leaves[w].ndim != 2:
            raise ValueError(f"layers: the weight at {w_path!r} has shape {leaves[w].shape}; "
                             "K-FAC dense layers need a 2-D kernel (d_in, d_out)")
        b = None if b_path is None else _index(params, b_path, "bias")
        if b is not None and (leaves[b].ndim != 1 or leaves[b].shape[0] != leaves[w].shape[1]):
            raise ValueError(f"layers: the bias at {b_path!r} has shape {leaves[b].shape}, the "
                             f"kernel {leaves[w].shape} needs ({leaves[w].shape[1]},)")
        if w in seen:
            raise ValueError(f"layers: the weight at {w_path!r} is listed twice")
        seen.add(w)
        out.append((w, b))
    return out


def trace_calls(loss_fn: Callable, params, batch) -> list:
    """The tagged dense calls of ``loss_fn(params, batch)``, from an abstract evaluation."""
    treedef = jax.tree_util.tree_structure(params)
    found: list = []

    def run(leaves, batch):
        col = Collector(leaves)
        with collecting(col):
            out = loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)
        found.extend(col.calls)
        return out

    jax.eval_shape(run, jax.tree_util.tree_leaves(params), batch)
    return found


def find_layers(loss_fn: Callable, params, batch) -> list[Layer]:
    """The dense layers that ``loss_fn(params, batch)`` calls through tagged layers.

    Traces the loss abstractly (no computation) and returns one :class:`Layer` per distinct
    kernel, to pass as ``layers=`` when the names do not follow the ``kernel``/``bias``
    convention of ``layers="auto"``.
    """
    paths = leaf_paths(params)
    out, seen = [], set()
    for c in trace_calls(loss_fn, params, batch):
        if c.weight in seen:
            continue
        seen.add(c.weight)
        out.append(Layer(paths[c.weight], None if c.bias is None else paths[c.bias]))
    return out

