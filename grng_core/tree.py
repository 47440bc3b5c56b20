"""Flat containers of leaves (list, tuple or dict of arrays) and their array namespace."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import array_api_compat


class Container(NamedTuple):
    """How to rebuild a flat params container: its kind and its keys, in leaf order."""

    kind: type
    keys: tuple

    def build(self, leaves):
        if self.kind is dict:
            return dict(zip(self.keys, leaves))
        return self.kind(leaves)


def flatten(tree: Any, what: str = "params") -> tuple[list, Container]:
    """Leaves of a flat list, tuple or dict of arrays, and how to rebuild it."""
    if isinstance(tree, dict):
        keys = tuple(tree.keys())
        return [tree[k] for k in keys], Container(dict, keys)
    if isinstance(tree, (list, tuple)):
        kind = list if isinstance(tree, list) else tuple
        return list(tree), Container(kind, tuple(range(len(tree))))
    raise TypeError(
        f"{what} must be a list, tuple or dict of arrays, got {type(tree).__name__}; "
        "adapters flatten nested models before calling the core"
    )


def leaves_like(tree: Any, container: Container, what: str) -> list:
    """Leaves of `tree`, checked to have the same keys as `container`."""
    leaves, c = flatten(tree, what)
    if c.keys != container.keys:
        how = " (the same keys in another order: build it in the params' order)" \
            if set(c.keys) == set(container.keys) else ""
        raise ValueError(f"{what} has keys {c.keys}, params have {container.keys}{how}")
    return leaves


def index_of(container: Container, key) -> int:
    """Position of the leaf with key `key` (a list index or a dict key)."""
    try:
        return container.keys.index(key)
    except ValueError:
        raise KeyError(f"no params leaf with key {key!r}; keys are {container.keys}") from None


_KINDS = (
    ("numpy", array_api_compat.is_numpy_array),
    ("torch", array_api_compat.is_torch_array),
    ("jax", array_api_compat.is_jax_array),
    ("cupy", array_api_compat.is_cupy_array),
)


def library(x) -> str:
    """'numpy', 'torch', 'jax', 'cupy', or the top-level module of another array type."""
    for name, test in _KINDS:
        if test(x):
            return name
    return type(x).__module__.split(".")[0]


def namespace(*groups: tuple[str, list]):
    """The one array namespace of all arrays in `groups` ((name, leaves) pairs).

    Raises TypeError naming the libraries when arrays of several libraries are mixed. Each
    array type is classified once (a step's leaves share one or two types).
    """
    seen: dict[str, str] = {}
    kinds: dict[type, str] = {}
    arrays = []
    for name, leaves in groups:
        for x in leaves:
            if x is None:
                continue
            kind = kinds.get(type(x))
            if kind is None:
                if not array_api_compat.is_array_api_obj(x):
                    raise TypeError(f"{name} holds a {type(x).__name__}, which is not an array")
                kind = kinds[type(x)] = library(x)
            seen.setdefault(kind, name)
            arrays.append(x)
    if len(seen) > 1:
        desc = ", ".join(f"{lib} (in {name})" for lib, name in seen.items())
        raise TypeError(f"mixed array libraries in one call: {desc}; use one library throughout")
    if not arrays:
        raise ValueError("params hold no arrays")
    return array_api_compat.array_namespace(*arrays)


def device(x):
    """`array_api_compat.device(x)`, but None for a JAX tracer without asking it: a tracer's
    `.device` raises an error whose message walks the whole program traced so far, which made
    tracing R-Kalman's step 2.6x slower (4.5 s against 1.7 s on a small transformer); None is
    what array_api_compat returns for it."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        return None
    return array_api_compat.device(x)


def tree_inner(xs, ys, xp):
    """Σ over leaves of Σᵢ xᵢyᵢ (a 0-d array): one sum per leaf, the partial sums stacked and
    summed once (fewer dispatched operations than a chain of additions)."""
    parts = [xp.sum(x * y) for x, y in zip(xs, ys)]
    return parts[0] if len(parts) == 1 else xp.sum(xp.stack(parts))
