"""The portable tree's host side: NumPy copies of any library's arrays, the JSON description
of a nested dict/list tree, and the tree rebuilt from an archive on a template's backend
(used by `grng_core.checkpoint`)."""

from __future__ import annotations

import array_api_compat
import numpy as np

from grng_core.tree import device, library

META_KEY = "__grng_meta__"


def to_host(x, where: str) -> np.ndarray:
    """A NumPy copy of one state array, whatever its library and device."""
    if isinstance(x, np.ndarray):
        return np.array(x, copy=True)
    if isinstance(x, np.generic):
        return np.asarray(x)
    if not array_api_compat.is_array_api_obj(x):
        raise TypeError(f"state entry {where!r} is a {type(x).__name__}, not an array; the "
                        "state must be a nested dict/list/tuple of arrays (from opt.init)")
    try:
        if array_api_compat.is_torch_array(x):
            x = x.detach()
            if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; widening is exact
                x = x.float()
            return x.cpu().numpy().copy()
        if array_api_compat.is_cupy_array(x):
            return x.get()
        xp = array_api_compat.array_namespace(x)
        if array_api_compat.is_array_api_strict_namespace(xp):
            x = xp.asarray(x, device=xp.Device("CPU_DEVICE"))
        return np.array(x, copy=True)
    except Exception as e:  # a jax tracer, a device that cannot be read, ...
        raise TypeError(f"cannot copy state entry {where!r} ({library(x)} array) to the host: "
                        f"{e}. Save concrete arrays, outside jax.jit") from e


def dtype_kind(name: str) -> str:
    if name == "bool":
        return "bool"
    if "int" in name:
        return "int"
    if "complex" in name:
        return "complex"
    return "float"


def dtype_name(x) -> str:
    """'float32', 'int32', 'bfloat16', ... for an array of any library."""
    return str(x.dtype).rsplit(".", 1)[-1]


def _key_json(k, where: str):
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"state dict key {k!r} at {where!r} is a {type(k).__name__}: "
                        "checkpoints support str and int keys")
    return k


def describe_tree(tree, path: tuple, leaves: list) -> dict:
    """The tree's structure as JSON-able nodes; leaves collected as (path, array)."""
    where = "/".join(str(p) for p in path) or "<root>"
    if isinstance(tree, dict):
        return {"dict": [[_key_json(k, where), describe_tree(v, (*path, k), leaves)]
                         for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"list" if isinstance(tree, list) else "tuple":
                [describe_tree(v, (*path, i), leaves) for i, v in enumerate(tree)]}
    if tree is None:
        return {"none": True}
    leaves.append((path, tree))
    return {"leaf": len(leaves) - 1}


def entry_names(paths: list[tuple]) -> list[str]:
    """Readable, unique archive names ('kfac/0/1/N/A'); '#n' added on a collision."""
    names, used = [], {META_KEY}
    for path in paths:
        base = "/".join(str(p) for p in path) or "_"
        name, n = base, 1
        while name in used:
            name, n = f"{base}#{n}", n + 1
        used.add(name)
        names.append(name)
    return names


def fmt_path(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def build(node, like, path, arrays, specs, source):
    """The new state: the file's arrays placed as `like`'s (or NumPy when like is None)."""
    where = fmt_path(path)
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"{source}: corrupted structure at {where!r}")
    (kind, body), = node.items()
    if kind == "dict":
        if like is not None and not isinstance(like, dict):
            raise ValueError(f"{source}: at {where!r} the file has a dict, the template a "
                             f"{type(like).__name__}")
        if not isinstance(body, list):
            raise ValueError(f"{source}: corrupted structure at {where!r}")
        file_keys = [k for k, _ in body]
        if like is not None:
            missing = [k for k in like if k not in file_keys]
            extra = [k for k in file_keys if k not in like]
            if missing or extra:
                raise ValueError(
                    f"{source}: keys do not match the template state at {where!r}: the file "
                    f"lacks {missing}, has extra {extra}")
            sub = dict(body)
            return {k: build(sub[k], v, (*path, k), arrays, specs, source)
                    for k, v in like.items()}
        return {k: build(v, None, (*path, k), arrays, specs, source) for k, v in body}
    if kind in ("list", "tuple"):
        if like is not None and not isinstance(like, (list, tuple)):
            raise ValueError(f"{source}: at {where!r} the file has a {kind}, the template a "
                             f"{type(like).__name__}")
        if like is not None and len(like) != len(body):
            raise ValueError(f"{source}: at {where!r} the file has {len(body)} entries, the "
                             f"template {len(like)}")
        likes = like if like is not None else [None] * len(body)
        items = [build(n, v, (*path, i), arrays, specs, source)
                 for i, (n, v) in enumerate(zip(body, likes))]
        if like is None:
            return items if kind == "list" else tuple(items)
        if isinstance(like, list):
            return items
        return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)
    if kind == "none":
        if like is not None:
            raise ValueError(f"{source}: at {where!r} the file has None, the template an array")
        return None
    if kind == "leaf":
        return _build_leaf(body, like, where, arrays, specs, source)
    raise ValueError(f"{source}: corrupted structure at {where!r} (node {kind!r})")


def _build_leaf(body, like, where, arrays, specs, source):
    """One array of the file, checked against the template's and placed like it."""
    if not isinstance(body, int) or not 0 <= body < len(specs):
        raise ValueError(f"{source}: corrupted structure at {where!r}")
    spec = specs[body]
    a = arrays[spec["name"]]
    if like is None:
        return a
    if not array_api_compat.is_array_api_obj(like):
        raise ValueError(f"{source}: at {where!r} the file has an array, the template a "
                         f"{type(like).__name__}")
    if tuple(a.shape) != tuple(like.shape):
        raise ValueError(f"{source}: at {where!r} the file has shape {tuple(a.shape)}, the "
                         f"template {tuple(like.shape)}")
    if dtype_kind(spec["dtype"]) != dtype_kind(dtype_name(like)):
        raise ValueError(f"{source}: at {where!r} the file has dtype {spec['dtype']}, the "
                         f"template {dtype_name(like)}")
    return place(a, like)


def place(a: np.ndarray, like):
    """`a` as an array of `like`'s library, device and dtype (a fresh array)."""
    a = np.asarray(a, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    if isinstance(like, (np.ndarray, np.generic)):  # NumPy ops turn 0-d arrays into scalars
        return np.array(a, dtype=like.dtype, copy=True)
    xp = array_api_compat.array_namespace(like)
    # the array API's asarray places a copy on like's device (a jax device or sharding, a torch
    # device, a CuPy device), with no framework import here
    out = xp.asarray(a, device=device(like), copy=True)
    return out if out.dtype == like.dtype else xp.astype(out, like.dtype)
