"""The one codec between the typed state (`grng_core.state`) and the portable tree.

The portable tree is checkpoint format 1 (nested dicts and lists of arrays, string keys), the
layout every GRNG checkpoint file, torch `state_dict` and CuPy save has used since format 1:

    step, skipped, curvature_count            int32 scalars
    momentum                                  [one array per leaf]          (momentum != 0)
    diag  (RENG/RING) | belief (R-Kalman)     {"<leaf position>": array}    (not RENG/RING woodbury)
    kfac                                      {"<w>/<b or ->/<T or N>": {A, S, A_inv, S_inv
                                               [, trace_A, trace_S]}}      (structure kfac)
                                              (eigh with a per-step damping: A, S, A_vecs,
                                               A_vals, S_vecs, S_vals instead of the inverses)

Layer keys spell the layout for people and for reading the file without a template; inside the
library the layout is the typed `LayerLayout` field.
"""

from __future__ import annotations

from grng_core.state import Belief, KfacLayer, LayerLayout, OptState, Preconditioner

_FIELDS = tuple(f for f in KfacLayer._fields if f != "layout")


def layer_key(L: LayerLayout) -> str:
    """'<weight>/<bias or ->/<T or N>[D]': the layer's key in the portable tree (D: an
    embedding's diagonal A)."""
    return (f"{L.weight}/{'-' if L.bias is None else L.bias}/{'T' if L.transposed else 'N'}"
            f"{'D' if L.a_diagonal else ''}")


def encode(state: OptState) -> dict:
    """The portable tree of a typed state (arrays shared, not copied)."""
    tree: dict = {"step": state.step, "skipped": state.skipped,
                  "curvature_count": state.curvature_count}
    if state.momentum is not None:
        tree["momentum"] = list(state.momentum)
    curv = state.curvature
    diag_key = "belief" if isinstance(curv, Belief) else "diag"
    if curv.diagonal is not None:
        tree[diag_key] = {str(i): v for i, v in enumerate(curv.diagonal) if v is not None}
    if curv.kfac is not None:
        tree["kfac"] = {layer_key(layer.layout): _encode_layer(layer) for layer in curv.kfac}
    return tree


def _encode_layer(layer: KfacLayer) -> dict:
    """The layer's arrays by field name (fields that are None are left out)."""
    return {k: getattr(layer, k) for k in _FIELDS if getattr(layer, k) is not None}


def decode(tree: dict, like: OptState | None = None, n_leaves: int | None = None) -> OptState:
    """The typed state of a portable tree.

    like: a template state (this optimizer's `init`), whose layouts and kind (preconditioner or
    belief) are used; the tree must have its keys (`grng_core.checkpoint` checks that).
    Without a template the layout is read from the tree's keys and the factors' shapes, and
    `n_leaves` (default: inferred) sets the length of the per-leaf tuples.
    """
    if like is not None:
        return _decode_like(tree, like)
    kind = Belief if "belief" in tree else Preconditioner
    diag_tree = tree.get("belief", tree.get("diag"))
    layers = None
    if "kfac" in tree:
        layers = tuple(_decode_layer(v, parse_layer_key(k, v)) for k, v in
                       sorted(tree["kfac"].items(), key=lambda kv: int(kv[0].split("/")[0])))
    n = n_leaves if n_leaves is not None else _count_leaves(tree, layers)
    diag = None
    if diag_tree is not None:
        diag = tuple(diag_tree.get(str(i)) for i in range(n))
    momentum = tree.get("momentum")
    return OptState(step=tree["step"], skipped=tree["skipped"],
                    curvature_count=tree["curvature_count"],
                    momentum=None if momentum is None else tuple(momentum),
                    curvature=kind(diagonal=diag, kfac=layers))


def _decode_like(tree: dict, like: OptState) -> OptState:
    curv = like.curvature
    diag_tree = tree.get("belief" if isinstance(curv, Belief) else "diag") or {}
    diag = None
    if curv.diagonal is not None:
        diag = tuple(None if v is None else diag_tree[str(i)]
                     for i, v in enumerate(curv.diagonal))
    layers = None
    if curv.kfac is not None:
        layers = tuple(_decode_layer(tree["kfac"][layer_key(x.layout)], x.layout)
                       for x in curv.kfac)
    momentum = None if like.momentum is None else tuple(tree["momentum"])
    return OptState(step=tree["step"], skipped=tree["skipped"],
                    curvature_count=tree["curvature_count"], momentum=momentum,
                    curvature=type(curv)(diagonal=diag, kfac=layers))


def _decode_layer(entry: dict, layout: LayerLayout) -> KfacLayer:
    return KfacLayer(layout, *(entry.get(k) for k in _FIELDS))


def parse_layer_key(key: str, entry: dict | None = None) -> LayerLayout:
    """The layout a portable layer key spells; sizes from the entry's factors when given."""
    try:
        w, b, tr = key.split("/")
        weight, bias = int(w), None if b == "-" else int(b)
    except ValueError:
        raise ValueError(f"invalid K-FAC layer key {key!r} (expected '<w>/<b or ->/<T or N>')"
                         ) from None
    if tr not in ("T", "N", "TD", "ND"):
        raise ValueError(f"invalid K-FAC layer key {key!r}: orientation must be T or N "
                         "(D appended for an embedding's diagonal A)")
    d_out = d_in = 0
    if entry is not None:
        d_out = int(entry["S"].shape[0])
        d_in = int(entry["A"].shape[0]) - (bias is not None)
    return LayerLayout(weight, bias, tr[0] == "T", d_out, d_in, tr.endswith("D"))


def _count_leaves(tree: dict, layers) -> int:
    if "momentum" in tree:
        return len(tree["momentum"])
    positions = [int(k) for k in tree.get("belief", tree.get("diag", {}))]
    positions += [i for x in layers or () for i in x.layout.positions]
    return max(positions, default=-1) + 1


def mismatch(tree, template, path: str = "state") -> str | None:
    """Where a portable tree differs from a template tree in structure, shape or dtype: a
    sentence naming the first difference, or None when it fits."""
    if isinstance(template, dict):
        if not isinstance(tree, dict) or set(map(str, tree)) != set(map(str, template)):
            got = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
            return f"{path} has keys {got}, this model needs {sorted(map(str, template))}"
        for k, v in template.items():
            found = mismatch(tree[k], v, f"{path}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(template, (list, tuple)):
        if not isinstance(tree, (list, tuple)) or len(tree) != len(template):
            n = len(tree) if isinstance(tree, (list, tuple)) else type(tree).__name__
            return f"{path} has {n} entries, this model needs {len(template)}"
        for j, (a, b) in enumerate(zip(tree, template)):
            found = mismatch(a, b, f"{path}[{j}]")
            if found:
                return found
        return None
    have = (tuple(getattr(tree, "shape", ())), getattr(tree, "dtype", type(tree).__name__))
    want = (tuple(template.shape), template.dtype)
    return None if have == want else f"{path} is {have} in the state, this model needs {want}"


def to_portable(tree):
    """`tree` with every typed state inside it (e.g. {"params": ..., "opt": state}) encoded."""
    if isinstance(tree, OptState):
        return encode(tree)
    if isinstance(tree, dict):
        return {k: to_portable(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(to_portable(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_portable(v) for v in tree)
    return tree


def from_portable(tree, like):
    """The inverse of `to_portable` for a tree read with the template `like`."""
    if isinstance(like, OptState):
        return decode(tree, like)
    if isinstance(like, dict):
        return {k: from_portable(tree[k], v) for k, v in like.items()}
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*(from_portable(t, v) for t, v in zip(tree, like)))
    if isinstance(like, (list, tuple)):
        return type(like)(from_portable(t, v) for t, v in zip(tree, like))
    return tree
