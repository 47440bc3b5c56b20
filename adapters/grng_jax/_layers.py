"""Which params leaves form K-FAC dense layers: found by name, given, or traced from the loss."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from grng_core.structures.rows import shared_by_batch, shared_text
from grng_jax._shared_ids import shared_ids
from grng_jax._tags import Collector, Lifted, collecting
from grng_jax._uncovered import UNCOVERED


class Layer(NamedTuple):
    """One K-FAC layer of a params pytree: the paths of its kernel (Flax layout: input axes
    first, (d_in..., d_out...)) and bias.

    A path is a tuple of plain keys (``("Dense_0", "kernel")``), a ``"/"``-joined string
    (``"Dense_0/kernel"``) or a ``jax.tree_util.keystr`` string (``"['Dense_0']['kernel']"``).
    embed: an embedding table (vocab, features) looked up by token ids (A diagonal, §2.1).
    in_axes: how many kernel axes index the input (None: all but the output axis; a
    DenseGeneral with several output axes, e.g. attention's query (d, heads, head_dim), has 1).
    transposed: True for the Flax layout (input axes first: ``kernel`` of flax.linen, flax.nnx,
    :func:`dense`), False for the equinox / torch layout (output axis first: equinox's
    ``weight`` (out, in) or (out, in, *kernel_size)).
    """

    weight: Any
    bias: Any = None
    embed: bool = False
    in_axes: int | None = None
    transposed: bool = True


class LayerRef(NamedTuple):
    """A resolved layer: leaf indices and how the core reads the kernel."""

    weight: int
    bias: int | None
    embed: bool = False
    in_axes: int | None = None
    transposed: bool = True

    def resolved_in_axes(self, ndim: int) -> int:
        return ndim - 1 if self.in_axes is None else self.in_axes

    def out_shape(self, shape: tuple) -> tuple:
        """The kernel's output axes (what its bias must hold)."""
        k = self.resolved_in_axes(len(shape))
        return tuple(shape[k:]) if self.transposed else tuple(shape[:len(shape) - k])


def plain_arrays(params):
    """`params` with flax.nnx Variables replaced by their arrays (``nnx.Optimizer`` hands
    ``init`` a State of Variables and ``update`` a State of arrays: both must give the same
    leaves and paths)."""
    if "flax.nnx" not in sys.modules:
        return params
    from flax import nnx

    return nnx.as_pure(params)


def _plain(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


#: leaf names of per-feature vectors, stacked to ≥ 2 axes under nn.scan / nnx.scan: no matrix
VECTOR_NAMES = ("bias", "scale")


def is_weight_matrix(path: tuple, leaf) -> bool:
    """A leaf of ≥ 2 axes that is not a scanned stack of biases or norm scales ((L, d) under
    nn.scan or nnx.scan: layer-wise vectors, which the warnings must not count as matrices)."""
    return getattr(leaf, "ndim", 0) >= 2 and not (path and str(path[-1]) in VECTOR_NAMES)


def leaf_paths(params) -> list[tuple]:
    """The path of every leaf, as a tuple of plain keys, in ``tree_flatten`` order (a flax.nnx
    Variable's leaf is named by the Variable's path)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(plain_arrays(params))
    return [tuple(_plain(e) for e in path) for path, _ in flat]


def _keystrs(params) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(plain_arrays(params))
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


def auto_layers(params) -> list[LayerRef]:
    """Layers by name. Flax (flax.linen, flax.nnx, :func:`init_dense`): a leaf named ``kernel``
    with at least 2 axes (Dense, DenseGeneral, Conv; input axes first) with its sibling ``bias``
    when that matches the kernel's trailing (output) axes, whose count then fixes the input
    axes; a 2-D leaf named ``embedding`` (Embed). Without a bias a kernel's output is its last
    axis (a multi-output DenseGeneral without bias needs ``layers=find_layers(...)``: the update
    says so). Equinox (``nn.Linear``, ``nn.Conv``): a leaf named ``weight`` with at least 2 axes
    and a sibling ``bias`` of as many elements as its first (output) axis; a bias-less equinox
    layer (and ``nn.Embedding``'s ``weight``) is not registered by name:
    ``layers=find_layers(...)`` reads it from the model's calls."""
    leaves = jax.tree_util.tree_leaves(params)
    paths = leaf_paths(params)
    where = {p: i for i, p in enumerate(paths)}
    out = []
    for i, (p, x) in enumerate(zip(paths, leaves)):
        ndim = getattr(x, "ndim", 0)
        if p and p[-1] == "embedding" and ndim == 2:
            out.append(LayerRef(i, None, embed=True))
            continue
        if p and p[-1] == "weight" and ndim >= 2:
            b = where.get(p[:-1] + ("bias",))
            if b is not None and math.prod(leaves[b].shape) == x.shape[0]:
                out.append(LayerRef(i, b, transposed=False))
            continue
        if not p or p[-1] != "kernel" or ndim < 2:
            continue
        b = where.get(p[:-1] + ("bias",))
        in_axes = None
        if b is not None:
            tail = tuple(leaves[b].shape)
            if 0 < len(tail) < ndim and tuple(x.shape[ndim - len(tail):]) == tail:
                in_axes = ndim - len(tail)
            else:
                b = None
        out.append(LayerRef(i, b, in_axes=in_axes))
    return out


def resolve_layers(params, layers) -> list[LayerRef]:
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
        if not isinstance(entry, Layer):
            entry = Layer(entry)
        w = _index(params, entry.weight, "weight")
        shape = tuple(leaves[w].shape)
        k = len(shape) - 1 if entry.in_axes is None else entry.in_axes
        if len(shape) < 2 or not 1 <= k < len(shape) or (entry.embed and len(shape) != 2):
            raise ValueError(f"layers: the weight at {entry.weight!r} has shape {shape}; K-FAC "
                             "needs a kernel with input and output axes (Flax layout "
                             "(d_in..., d_out...), or transposed=False: (d_out, d_in...)), "
                             "in_axes between 1 and ndim-1")
        b = None if entry.bias is None else _index(params, entry.bias, "bias")
        ref = LayerRef(w, b, entry.embed, entry.in_axes, bool(entry.transposed))
        want = ref.out_shape(shape)
        if b is not None and math.prod(leaves[b].shape) != math.prod(want):
            raise ValueError(f"layers: the bias at {entry.bias!r} has shape "
                             f"{tuple(leaves[b].shape)}, the kernel {shape} "
                             f"({'Flax layout' if ref.transposed else 'output axis first'}) "
                             f"needs {want} (its output axes)")
        if w in seen:
            raise ValueError(f"layers: the weight at {entry.weight!r} is listed twice")
        seen.add(w)
        out.append(ref)
    return out


def batch_size(batch) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch holds no arrays")
    odd = [x for x in leaves if not hasattr(x, "ndim")]
    if odd:
        raise ValueError(f"every leaf of batch must be an array with the examples on axis 0; "
                         f"it holds {type(odd[0]).__name__} {odd[0]!r}: keep settings such as "
                         "a train flag out of batch (close over them in loss_fn)")
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("every leaf of batch needs the same leading batch axis, got shapes "
                         f"{[tuple(x.shape) for x in leaves]} (a setting or a scalar: close "
                         "over it in loss_fn instead of passing it in batch)")
    return int(sizes.pop())  # type: ignore[arg-type]


def example_shapes(batch) -> tuple:
    """The shapes of one example of the batch's leaves (without their leading batch axis)."""
    return tuple({tuple(x.shape[1:]) for x in jax.tree_util.tree_leaves(batch) if x.ndim})


def shared_reason(call, examples: int | None, examples_shapes: tuple = (),
                  shared: frozenset | set = frozenset()) -> str | None:
    """Why a tagged call's input gives no per-example K-FAC rows (its input is shared by the
    batch and its output broadcast over it: a position embedding of ids (1, T), or of
    `arange(T)` for inputs (B, T); ALGORITHMS.md §2.1,
    `grng_core.structures.rows.shared_by_batch`), or None. `shared`: weights whose ids a
    trace with one more example showed to be shared (T = B, `_shared_ids.shared_ids`)."""
    if call.weight in shared and examples:
        return shared_text(tuple(call.inputs.shape), examples)
    features = 0 if call.kind == "embed" else 1 if call.kind == "conv" else call.in_axes
    return shared_by_batch(tuple(call.inputs.shape), examples, features=features,
                           example_shapes=examples_shapes)


def _traced(loss_fn: Callable, params, batch) -> Collector:
    """The Collector of an abstract evaluation of ``loss_fn(params, batch)``."""
    treedef = jax.tree_util.tree_structure(params)
    leaves = jax.tree_util.tree_leaves(params)
    col = Collector(leaves)

    def run(leaves, batch):
        col.ids = {id(x): i for i, x in enumerate(leaves)}  # the traced leaves
        with collecting(col):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)

    jax.eval_shape(run, leaves, batch)
    return col


def trace_calls(loss_fn: Callable, params, batch) -> tuple[list, dict]:
    """The tagged dense calls of ``loss_fn(params, batch)``, from an abstract evaluation, and
    {leaf index: what else uses it} for the kernels also used outside them (a tied
    embedding's `attend`)."""
    col = _traced(loss_fn, params, batch)
    return col.calls, col.other_uses


def batch_coupled(loss_fn: Callable, params, batch) -> list[str]:
    """The layers of ``loss_fn(params, batch)`` whose output for one example depends on the
    batch's others (BatchNorm in training mode), from an abstract evaluation."""
    return _traced(loss_fn, params, batch).batch_coupled


class FoundLayers(list):
    """`find_layers`'s list of :class:`Layer`, with `reasons`: {leaf path: why a weight matrix
    the loss uses is not among them}, which ``grng_jax.describe`` and the init warning show."""

    reasons: dict[tuple, str]


NOT_TAGGED = ("not called through a tagged layer in loss_fn (a hand-written matmul or another "
              "layer type, or not reached by the loss): find_layers found no call to collect "
              "statistics from")


def _module(path: tuple) -> str:
    """A leaf's module path as the layer hooks name it ('Block_0/Dense_0')."""
    return "/".join(str(k) for k in path[:-1])


def lifted_modules(nested: dict[str, list[Lifted]], leaves, paths,
                   used: set | frozenset = frozenset()) -> dict[str, list[str]]:
    """{transformation: the module paths of the layers called inside it}: the path its hook
    gave, else (flax.nnx's hooks do not know it) the modules of the weight matrices without a
    tagged call (not in `used`) whose shape is the kernel's there or, under a scan, its stack's
    (L, ...); the layer's kind where none matches."""
    out: dict[str, list[str]] = {}
    for how, records in nested.items():
        mods = out.setdefault(how, [])
        for r in records:
            match = [] if r.name else [
                _module(paths[i]) for i, x in enumerate(leaves)
                if i not in used and is_weight_matrix(paths[i], x)
                and r.shape in (tuple(x.shape), tuple(x.shape[1:]))]
            mods.extend([r.name] if r.name else match or [r.kind])
    return {how: list(dict.fromkeys(mods)) for how, mods in out.items()}


def _other_use(how: str | None, lifted: str | None = None) -> str:
    """find_layers' reason for a matrix with no tagged call: how it is used, where known
    (`lifted`: the nested transformation its layer is called inside, e.g. nn.scan)."""
    if how is None and lifted is not None:
        return (f"its layer is called inside {lifted}, which lifts the layer's parameters into "
                "the transformation: its K-FAC statistics cannot be collected there (call it "
                "outside, or leave it on the diagonal)")
    if how is None:
        return NOT_TAGGED
    if how.startswith(UNCOVERED):  # a grouped convolution, circular padding
        return f"called as {how[len(UNCOVERED):]}, a configuration K-FAC does not cover"
    return f"used by {how}, where its statistics cannot be collected"


def find_layers(loss_fn: Callable, params, batch) -> list[Layer]:
    """The dense layers that ``loss_fn(params, batch)`` calls through tagged layers.

    Traces the loss abstractly (no computation) and returns one :class:`Layer` per distinct
    kernel, to pass as ``layers=`` when the names do not follow the ``kernel``/``bias``
    convention of ``layers="auto"``. A kernel called on an input the batch shares (position
    ids of shape (1, T): `shared_reason`), or also used outside its tagged calls (a tied
    embedding's `attend`, whose statistics K-FAC cannot see), is left out: it stays on the
    diagonal.
    """
    paths = leaf_paths(params)
    leaves = jax.tree_util.tree_leaves(params)
    col = _traced(loss_fn, params, batch)
    calls, other = col.calls, col.other_uses
    used = {c.weight for c in calls} | {c.bias for c in calls if c.bias is not None}
    lifted = {module: how for how, modules in
              lifted_modules(col.nested, leaves, paths, used).items() for module in modules}
    examples, shapes = batch_size(batch), example_shapes(batch)
    shared = shared_ids(calls, batch, examples, shapes,
                        lambda b: trace_calls(loss_fn, params, b)[0],
                        lambda w: "/".join(str(k) for k in paths[w]))
    out = FoundLayers()
    out.reasons = {}
    for c in calls:  # left to the diagonal
        why = (f"also used by {other[c.weight]}, which K-FAC statistics cannot see"
               if c.weight in other else shared_reason(c, examples, shapes, shared))
        if why:
            out.reasons[paths[c.weight]] = why
    # (an equinox conv's (C, 1, 1) bias is a vector, no weight matrix: no reason of its own)
    out.reasons.update({paths[i]: _other_use(other.get(i), lifted.get(_module(paths[i])))
                        for i, x in enumerate(leaves)
                        if is_weight_matrix(paths[i], x) and i not in used})
    seen = {c.weight for c in calls if paths[c.weight] in out.reasons}
    for c in calls:
        if c.weight in seen:
            continue
        seen.add(c.weight)
        default = c.in_axes == leaves[c.weight].ndim - 1  # all but the output axis: implied
        out.append(Layer(paths[c.weight], None if c.bias is None else paths[c.bias],
                         embed=c.kind == "embed", in_axes=None if default else c.in_axes,
                         transposed=c.transposed))
    return out

