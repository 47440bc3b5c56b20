"""Portable optimizer checkpoints: one framework-neutral file for the state of any backend.

    gc.save_state(path, state, opt=opt)                  # torch, jax, numpy, cupy, array_api_strict
    state = gc.load_state(path, like=opt.init(params), opt=opt)   # any backend, any device

The file is a NumPy ``.npz`` archive written with ``allow_pickle=False``:

- one entry per array of the state, named by its path in the state tree joined with ``/``
  (``"step"``, ``"momentum/0"``, ``"kfac/0/1/N/A"``; a layer key such as ``"0/1/N"`` keeps
  its own slashes: the exact tree is in the metadata, the names are for people);
- the entry ``"__grng_meta__"``: UTF-8 JSON stored as a ``uint8`` array, holding the format
  name and version, the optimizer's name and hyperparameters (schedules recorded as
  ``"<callable>"``), the library the state came from, and the state's tree structure (dict keys,
  list lengths, each array's entry name, shape and dtype).

Writes are atomic: the archive goes to a temporary file in the target's directory, is flushed
and fsync'ed, then moved over the target with ``os.replace``; a failed write leaves the previous
file as it was. Loading never executes code from the file (``np.load(allow_pickle=False)``; an
object array is rejected) and never mutates anything: it returns a new state built from the
template ``like`` (library, device, dtype and container types of each array), or raises
ValueError, leaving the live state untouched.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from typing import Any

import array_api_compat
import numpy as np

FORMAT = "grng-optimizer-state"
FORMAT_VERSION = 1
META_KEY = "__grng_meta__"
CALLABLE = "<callable>"

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_KEY",
    "hyperparams_json",
    "load_state",
    "read_metadata",
    "save_state",
    "state_from_numpy",
    "state_to_numpy",
]


# ------------------------------------------------------------------ host conversion
def _library(x) -> str:
    for name, test in (("numpy", array_api_compat.is_numpy_array),
                       ("torch", array_api_compat.is_torch_array),
                       ("jax", array_api_compat.is_jax_array),
                       ("cupy", array_api_compat.is_cupy_array)):
        if test(x):
            return name
    return type(x).__module__.split(".")[0]


def _to_host(x, where: str) -> np.ndarray:
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
        raise TypeError(f"cannot copy state entry {where!r} ({_library(x)} array) to the host: "
                        f"{e}. Save concrete arrays, outside jax.jit") from e


def _dtype_kind(name: str) -> str:
    if name == "bool":
        return "bool"
    if "int" in name:
        return "int"
    if "complex" in name:
        return "complex"
    return "float"


def _dtype_name(x) -> str:
    """'float32', 'int32', 'bfloat16', ... for an array of any library."""
    return str(x.dtype).rsplit(".", 1)[-1]


# ------------------------------------------------------------------ tree structure
def _key_json(k, where: str):
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"state dict key {k!r} at {where!r} is a {type(k).__name__}: "
                        "checkpoints support str and int keys")
    return k


def _describe(tree, path: tuple, leaves: list) -> dict:
    """The tree's structure as JSON-able nodes; leaves collected as (path, array)."""
    where = "/".join(str(p) for p in path) or "<root>"
    if isinstance(tree, dict):
        return {"dict": [[_key_json(k, where), _describe(v, (*path, k), leaves)]
                         for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"list" if isinstance(tree, list) else "tuple":
                [_describe(v, (*path, i), leaves) for i, v in enumerate(tree)]}
    if tree is None:
        return {"none": True}
    leaves.append((path, tree))
    return {"leaf": len(leaves) - 1}


def _entry_names(paths: list[tuple]) -> list[str]:
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


def _json_value(v):
    if callable(v):
        return CALLABLE
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return repr(v)


def hyperparams_json(opt) -> dict:
    """The optimizer's hyperparameters as recorded in a checkpoint (schedules: '<callable>')."""
    return {k: _json_value(v) for k, v in opt.hyperparams.items()}


# ------------------------------------------------------------------ NumPy form
def state_to_numpy(state, opt=None, extra: dict | None = None) -> dict[str, np.ndarray]:
    """The archive's entries: NumPy copies of the state's arrays plus the metadata entry.

    `extra`: optional JSON-able dict stored in the metadata (adapters keep host counters there).
    """
    leaves: list = []
    structure = _describe(state, (), leaves)
    names = _entry_names([p for p, _ in leaves])
    arrays, specs, libs = {}, [], set()
    for name, (path, x) in zip(names, leaves):
        where = "/".join(str(p) for p in path)
        host = _to_host(x, where)
        if host.dtype.hasobject:
            raise TypeError(f"state entry {where!r} has dtype object: not an array of numbers")
        libs.add(_library(x))
        arrays[name] = host
        specs.append({"name": name, "shape": list(host.shape), "dtype": _dtype_name(x)})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "optimizer": None if opt is None else opt.name,
        "hyperparams": None if opt is None else hyperparams_json(opt),
        "library": sorted(libs)[0] if len(libs) == 1 else sorted(libs),
        "structure": structure,
        "arrays": specs,
        "extra": _json_value(extra or {}),
    }
    try:
        from grng_core import __version__ as grng_version
    except ImportError:  # pragma: no cover - during package import
        grng_version = None
    meta["grng_version"] = grng_version
    raw = json.dumps(meta, sort_keys=True).encode("utf-8")
    arrays[META_KEY] = np.frombuffer(raw, dtype=np.uint8).copy()
    return arrays


def _parse_meta(entry: np.ndarray, source: str) -> dict:
    if entry.dtype != np.uint8 or entry.ndim != 1:
        raise ValueError(f"{source}: metadata entry {META_KEY!r} is not a uint8 byte string")
    try:
        meta = json.loads(entry.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{source}: metadata entry is not valid JSON ({e}): corrupted "
                         "checkpoint") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{source}: not a GRNG optimizer-state checkpoint (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{source}: written with checkpoint format version {version}, newer "
                         f"than this grng reads (up to {FORMAT_VERSION}); upgrade grng")
    for k in ("structure", "arrays"):
        if k not in meta:
            raise ValueError(f"{source}: metadata lacks {k!r}: corrupted checkpoint")
    return meta


def _check_opt(meta: dict, opt, source: str) -> None:
    if meta.get("optimizer") is None:
        raise ValueError(f"{source}: the checkpoint records no optimizer (saved without opt=); "
                         "load it without opt= to skip the optimizer check")
    if meta.get("optimizer") != opt.name:
        raise ValueError(f"{source}: checkpoint is for optimizer {meta.get('optimizer')!r}, "
                         f"loading into {opt.name!r}")
    saved = meta.get("hyperparams") or {}
    now = hyperparams_json(opt)
    diff = [f"{k}: file {saved.get(k, '<absent>')!r}, optimizer {now.get(k, '<absent>')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k, "<absent>") !=
            now.get(k, "<absent>")]
    if diff:
        raise ValueError(f"{source}: checkpoint hyperparameters differ from the optimizer's "
                         f"({'; '.join(diff)})")


def _fmt_path(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _build(node, like, path, arrays, specs, source):
    """The new state: the file's arrays placed as `like`'s (or NumPy when like is None)."""
    where = _fmt_path(path)
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
            return {k: _build(sub[k], v, (*path, k), arrays, specs, source)
                    for k, v in like.items()}
        return {k: _build(v, None, (*path, k), arrays, specs, source) for k, v in body}
    if kind in ("list", "tuple"):
        if like is not None and not isinstance(like, (list, tuple)):
            raise ValueError(f"{source}: at {where!r} the file has a {kind}, the template a "
                             f"{type(like).__name__}")
        if like is not None and len(like) != len(body):
            raise ValueError(f"{source}: at {where!r} the file has {len(body)} entries, the "
                             f"template {len(like)}")
        likes = like if like is not None else [None] * len(body)
        items = [_build(n, v, (*path, i), arrays, specs, source)
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
        if _dtype_kind(spec["dtype"]) != _dtype_kind(_dtype_name(like)):
            raise ValueError(f"{source}: at {where!r} the file has dtype {spec['dtype']}, the "
                             f"template {_dtype_name(like)}")
        return _place(a, like)
    raise ValueError(f"{source}: corrupted structure at {where!r} (node {kind!r})")


def _place(a: np.ndarray, like):
    """`a` as an array of `like`'s library, device and dtype (a fresh array)."""
    a = np.asarray(a, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    if isinstance(like, (np.ndarray, np.generic)):  # NumPy ops turn 0-d arrays into scalars
        return np.array(a, dtype=like.dtype, copy=True)
    xp = array_api_compat.array_namespace(like)
    # the array API's asarray places a copy on like's device (a jax device or sharding, a torch
    # device, a CuPy device), with no framework import here
    out = xp.asarray(a, device=array_api_compat.device(like), copy=True)
    return out if out.dtype == like.dtype else xp.astype(out, like.dtype)


def state_from_numpy(arrays: dict, like=None, opt=None, source: str = "checkpoint"):
    """A new state from the archive's entries (as `state_to_numpy` writes them; the entries
    may also be arrays of another library, e.g. torch tensors kept in a torch state_dict).

    like: template state (opt.init's result in the target backend); None gives NumPy arrays in
    the saved structure. opt: when given, the optimizer name and hyperparameters must match.
    Raises ValueError on any mismatch; never mutates `like`.
    """
    if META_KEY not in arrays:
        raise ValueError(f"{source}: no {META_KEY!r} entry: not a GRNG optimizer-state checkpoint")
    # entries may be arrays of any library (e.g. torch tensors kept in a torch state_dict)
    arrays = {k: v if isinstance(v, np.ndarray) else _to_host(v, k) for k, v in arrays.items()}
    meta = _parse_meta(arrays[META_KEY], source)
    if opt is not None:
        _check_opt(meta, opt, source)
    specs = meta["arrays"]
    if not isinstance(specs, list):
        raise ValueError(f"{source}: corrupted array list in the metadata")
    names = {s.get("name") for s in specs if isinstance(s, dict)}
    extra = sorted(set(arrays) - names - {META_KEY})
    missing = sorted(n for n in names if n not in arrays)
    if extra or missing or len(names) != len(specs):
        raise ValueError(f"{source}: entries do not match the metadata (missing {missing}, "
                         f"unexpected {extra}): corrupted or edited checkpoint")
    for s in specs:
        a = arrays[s["name"]]
        if list(a.shape) != list(s.get("shape", [])) or a.dtype.hasobject:
            raise ValueError(f"{source}: entry {s['name']!r} has shape {a.shape} and dtype "
                             f"{a.dtype}, the metadata says {s.get('shape')} "
                             f"{s.get('dtype')}: corrupted checkpoint")
    return _build(meta["structure"], like, (), arrays, specs, source)


# ------------------------------------------------------------------ files
def _read(path) -> dict[str, np.ndarray]:
    """Every entry of the archive as NumPy arrays; any problem is a clear ValueError."""
    source = f"checkpoint {os.fspath(path)!r}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{source} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{source} is not a .npz archive (corrupted, truncated or not a GRNG "
                         "checkpoint)")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                try:
                    out[name] = z[name]
                except ValueError as e:
                    if "pickle" in str(e) or "Object arrays" in str(e):
                        raise ValueError(
                            f"{source}: entry {name!r} holds a pickled Python object; "
                            "refusing to load it (checkpoints hold numeric arrays only and "
                            "loading never unpickles)") from e
                    raise
    except ValueError as e:
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source} could not be read ({e}): corrupted checkpoint") from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError) as e:
        raise ValueError(f"{source} could not be read ({type(e).__name__}: {e}): corrupted or "
                         "truncated checkpoint") from e
    except Exception as e:  # zlib.error and other decoder failures
        raise ValueError(f"{source} could not be read ({type(e).__name__}: {e}): corrupted "
                         "checkpoint") from e
    return out


def read_metadata(path) -> dict:
    """The checkpoint's metadata (format, version, optimizer, hyperparams, structure, extra)."""
    arrays = _read(path)
    source = f"checkpoint {os.fspath(path)!r}"
    if META_KEY not in arrays:
        raise ValueError(f"{source}: no {META_KEY!r} entry: not a GRNG optimizer-state checkpoint")
    return _parse_meta(arrays[META_KEY], source)


def _write_npz(fileobj, arrays: dict) -> None:
    np.savez(fileobj, **arrays)


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, else 0666 minus the process umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_state(path, state, opt=None, *, extra: dict | None = None) -> None:
    """Write `state` (any backend, concrete arrays) to `path` atomically, as a portable .npz.

    opt: the optimizer (its name and hyperparameters go into the metadata and are checked at
    load). extra: a JSON-able dict kept in the metadata (read back with `read_metadata`).
    The file name is used as given (no '.npz' is appended).
    """
    arrays = state_to_numpy(state, opt, extra)  # every device copy happens before any write
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp creates 0600; keep the usual permissions
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not available everywhere
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load_state(path, like: Any = None, opt=None):
    """A new state read from `path`, as arrays of `like`'s library, device and dtypes.

    like: a template state of the target backend, e.g. `opt.init(params)` there; its
    containers, shapes and dtypes must match the file (dtypes may differ in precision only:
    float64 -> float32 casts). None returns NumPy arrays in the saved structure.
    opt: when given, the file's optimizer name and hyperparameters must equal `opt`'s.
    Raises ValueError for a corrupted, mismatched, newer-format or pickle-holding file;
    `like` is never modified.
    """
    arrays = _read(path)
    return state_from_numpy(arrays, like, opt, source=f"checkpoint {os.fspath(path)!r}")
