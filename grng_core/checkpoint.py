"""Portable optimizer checkpoints: one framework-neutral file for the state of any backend.

    gc.save_state(path, state, opt=opt)                  # torch, jax, numpy, cupy, array_api_strict
    state = gc.load_state(path, like=opt.init(params), opt=opt)   # any backend, any device

The file is a NumPy ``.npz`` archive written with ``allow_pickle=False``:

- the typed state (`grng_core.state.OptState`) is written as its portable tree
  (`grng_core.codec`), and read back into the template's types;
- one entry per array of the state, named by its path in the state tree joined with ``/``
  (``"step"``, ``"momentum/0"``, ``"kfac/0/1/N/A"``; a layer key such as ``"0/1/N"`` keeps
  its own slashes: the exact tree is in the metadata, the names are for people);
- the entry ``"__grng_meta__"``: UTF-8 JSON stored as a ``uint8`` array, holding the format
  name and version, the optimizer's name and hyperparameters (a schedule recorded by its values
  at `SCHEDULE_STEPS`, to 6 digits: ``"schedule(1: 0.1, 2: 0.0999, ...)"``; ``"<callable>"``
  where it cannot be called with a step, as every schedule was before), the library the state
  came from, and the state's tree structure (dict keys, list lengths, each array's entry name,
  shape and dtype).

Writes are atomic: the archive goes to a temporary file in the target's directory, is flushed
and fsync'ed, then moved over the target with ``os.replace``; a failed write leaves the previous
file as it was. Loading never executes code from the file (``np.load(allow_pickle=False)``; an
object array is rejected) and never mutates anything: it returns a new state built from the
template ``like`` (library, device, dtype and container types of each array), or raises
ValueError, leaving the live state untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import numpy as np

from grng_core import codec
from grng_core._version import __version__
from grng_core.config import unused, upgrade_saved
from grng_core.npz_io import read_archive, write_atomic
from grng_core.npz_tree import META_KEY, build, describe_tree, dtype_name, entry_names, to_host
from grng_core.tree import library

FORMAT = "grng-optimizer-state"
FORMAT_VERSION = 1
CALLABLE = "<callable>"
#: where a schedule's values are recorded (the 1-based step t it is called with: §3 and
#: `grng_core.config`): its warm-up, its decay and late in a run
SCHEDULE_STEPS = (1, 2, 5, 10, 100, 1_000, 10_000, 100_000)
#: two recorded schedules are the same within this relative difference (another device's
#: float32 rounding of the same schedule; the record keeps 6 digits)
SCHEDULE_RTOL = 1e-5

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


# ------------------------------------------------------------------ NumPy form
def _schedule_json(fn) -> str:
    """A schedule as its values at `SCHEDULE_STEPS` (6 significant digits; compared within
    `SCHEDULE_RTOL`: `_same_schedule`), or `CALLABLE` where it cannot be evaluated. The step
    is given as a 0-d NumPy integer array (as the optimizer's step count is an array), else
    as a Python int."""
    for step in (lambda t: np.asarray(t, dtype=np.int32), int):
        try:
            values = [float(fn(step(t))) for t in SCHEDULE_STEPS]
        except Exception:  # not a function of the step alone, or not of this kind of step
            continue
        return "schedule(" + ", ".join(f"{t}: {v:.6g}" for t, v in
                                       zip(SCHEDULE_STEPS, values)) + ")"
    return CALLABLE


def _schedule_values(v) -> dict | None:
    """{step: value} of a recorded schedule, None for any other value."""
    if not (isinstance(v, str) and v.startswith("schedule(") and v.endswith(")")):
        return None
    try:
        pairs = [p.split(":") for p in v[len("schedule("):-1].split(",")]
        return {int(t): float(x) for t, x in pairs}
    except ValueError:
        return None


def _same_schedule(a, b) -> bool:
    """Two recorded schedules with the same steps and values within `SCHEDULE_RTOL`."""
    va, vb = _schedule_values(a), _schedule_values(b)
    return (va is not None and vb is not None and va.keys() == vb.keys()
            and all(math.isclose(va[t], vb[t], rel_tol=SCHEDULE_RTOL, abs_tol=1e-30)
                    for t in va))


def _json_value(v):
    if callable(v):
        return _schedule_json(v)
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
    """The optimizer's hyperparameters as recorded in a checkpoint (schedules by their values:
    `_schedule_json`)."""
    return {k: _json_value(v) for k, v in opt.config.as_dict().items()}


def state_to_numpy(state, opt=None, extra: dict | None = None,
                   leaf_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The archive's entries: NumPy copies of the state's arrays plus the metadata entry.

    `extra`: optional JSON-able dict stored in the metadata (adapters keep host counters there).
    `leaf_names`: the params leaves' names in leaf order (a dict's keys), checked at load.
    """
    state = codec.to_portable(state)
    leaves: list = []
    structure = describe_tree(state, (), leaves)
    names = entry_names([p for p, _ in leaves])
    arrays, specs, libs = {}, [], set()
    for name, (path, x) in zip(names, leaves):
        where = "/".join(str(p) for p in path)
        host = to_host(x, where)
        if host.dtype.hasobject:
            raise TypeError(f"state entry {where!r} has dtype object: not an array of numbers")
        libs.add(library(x))
        arrays[name] = host
        specs.append({"name": name, "shape": list(host.shape), "dtype": dtype_name(x)})
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
    if leaf_names is not None:
        meta["leaf_names"] = [str(n) for n in leaf_names]
    meta["grng_version"] = __version__
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


def hyperparams_diff(algorithm: str, saved: dict, now: dict) -> list[str]:
    """"name: file …, optimizer …" for every hyperparameter that differs between a file's
    (JSON; what its absent keys meant then: `upgrade_saved`) and the optimizer's, leaving out
    those that cannot change the steps (`unused`)."""
    saved, now = upgrade_saved(algorithm, saved), dict(now)
    for k in unused(algorithm, saved) + unused(algorithm, now):
        saved.pop(k, None)
        now.pop(k, None)
    # format-1 files of RING recorded gr, fd_scheme and fd_radius as None: absent now
    saved = {k: v for k, v in saved.items() if not (v is None and k not in now)}
    # files from before schedules were recorded by their values say only "<callable>"
    saved.update({k: now[k] for k, v in saved.items() if v == CALLABLE
                  and str(now.get(k, "")).startswith("schedule(")})
    return [f"{k}: file {saved.get(k, '<absent>')!r}, optimizer {now.get(k, '<absent>')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k, "<absent>") !=
            now.get(k, "<absent>") and not _same_schedule(saved.get(k), now.get(k))]


class OptCheck(NamedTuple):
    """How a loaded file's hyperparameters are compared with the optimizer's: `allow_changed`
    names those that may differ (a resumed run with another learning rate); `spelled` gives
    the adapter's names for the core's (grng_jax: lr -> learning_rate) in messages and in
    `allow_changed`."""

    allow_changed: tuple[str, ...] = ()
    spelled: tuple[tuple[str, str], ...] = ()


STRICT = OptCheck()  #: every hyperparameter must equal the optimizer's


def _check_opt(meta: dict, opt, source: str, check: OptCheck = STRICT) -> None:
    if meta.get("optimizer") is None:
        raise ValueError(f"{source}: the checkpoint records no optimizer (saved without opt=); "
                         "load it without opt= to skip the optimizer check")
    if meta.get("optimizer") != opt.name:
        raise ValueError(f"{source}: checkpoint is for optimizer {meta.get('optimizer')!r}, "
                         f"loading into {opt.name!r}")
    spelled = dict(check.spelled)
    known = {spelled.get(f.name, f.name) for f in dataclasses.fields(opt.config)}
    unknown = sorted(set(check.allow_changed) - known)
    if unknown:
        raise ValueError(f"allow_changed names no hyperparameter of {opt.name}: {unknown} "
                         f"(its hyperparameters: {', '.join(sorted(known))})")
    diff = [spelled.get(d.split(":")[0], d.split(":")[0]) + d[d.index(":"):]
            for d in hyperparams_diff(opt.name, meta.get("hyperparams") or {},
                                      hyperparams_json(opt))]
    diff = [d for d in diff if d.split(":")[0] not in check.allow_changed]
    if diff:
        # only values the step reads (not the state's layout) can change on a resume
        free = {spelled.get(k, k) for k in (*type(opt.config).schedulable(), "weight_decay")}
        keys = [d.split(":")[0] for d in diff]
        names = ", ".join(repr(k) for k in keys if k in free)
        fixed = ", ".join(k for k in keys if k not in free)
        verb = "shapes" if "," not in fixed else "shape"
        fix = (f"; to resume with the optimizer's values, pass allow_changed=({names},)"
               if not fixed else f"; {fixed} {verb} the state: build the optimizer with the "
               "file's values" + (f", then allow_changed=({names},) keeps the optimizer's "
                                  "values of the rest" if names else ""))
        raise ValueError(f"{source}: checkpoint hyperparameters differ from the optimizer's "
                         f"({'; '.join(diff)}){fix}")


def _check_leaf_order(saved, now, source: str) -> None:
    """The state is stored per leaf by position: the same names in another order (a dict
    built in another key order) would put each leaf's state on another leaf, so it is
    refused. Names of another naming (another framework's) cannot be compared: positions."""
    if saved is None or now is None:
        return
    now = [str(n) for n in now]
    if list(saved) != now and sorted(saved) == sorted(now):
        raise ValueError(f"{source}: the checkpoint's parameters are in the order {list(saved)}, "
                         f"these params in the order {now}: the state is kept per position, so "
                         "it would land on the wrong leaves. Build the params in the saved "
                         "order (e.g. dict(sorted(...)) where the file came from JAX)")


def state_from_numpy(arrays: dict, like=None, opt=None, source: str = "checkpoint",
                     leaf_names: list[str] | None = None, check: OptCheck = STRICT):
    """A new state from the archive's entries (as `state_to_numpy` writes them; the entries
    may also be arrays of another library, e.g. torch tensors kept in a torch state_dict).

    like: template state (opt.init's result in the target backend); None gives NumPy arrays in
    the saved structure. opt: when given, the optimizer name and hyperparameters must match.
    leaf_names: the params leaves' names in leaf order (`_check_leaf_order`). check: which
    hyperparameters may differ (`OptCheck`).
    Raises ValueError on any mismatch; never mutates `like`.
    """
    if META_KEY not in arrays:
        raise ValueError(f"{source}: no {META_KEY!r} entry: not a GRNG optimizer-state checkpoint")
    # entries may be arrays of any library (e.g. torch tensors kept in a torch state_dict)
    arrays = {k: v if isinstance(v, np.ndarray) else to_host(v, k) for k, v in arrays.items()}
    meta = _parse_meta(arrays[META_KEY], source)
    if opt is not None:
        _check_opt(meta, opt, source, check)
    _check_leaf_order(meta.get("leaf_names"), leaf_names, source)
    specs = meta["arrays"]
    if not isinstance(specs, list):
        raise ValueError(f"{source}: corrupted array list in the metadata")
    names: set[str] = {str(s.get("name")) for s in specs if isinstance(s, dict)}
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
    tree = build(meta["structure"], codec.to_portable(like), (), arrays, specs, source)
    return tree if like is None else codec.from_portable(tree, like)


# ------------------------------------------------------------------ files
def read_metadata(path) -> dict:
    """The checkpoint's metadata (format, version, optimizer, hyperparams, structure, extra)."""
    arrays = read_archive(path)
    source = f"checkpoint {os.fspath(path)!r}"
    if META_KEY not in arrays:
        raise ValueError(f"{source}: no {META_KEY!r} entry: not a GRNG optimizer-state checkpoint")
    return _parse_meta(arrays[META_KEY], source)


def save_state(path, state, opt=None, *, extra: dict | None = None,
               leaf_names: list[str] | None = None) -> None:
    """Write `state` (any backend, concrete arrays) to `path` atomically, as a portable .npz.

    opt: the optimizer (its name and hyperparameters go into the metadata and are checked at
    load). extra: a JSON-able dict kept in the metadata (read back with `read_metadata`).
    leaf_names: the params leaves' names in leaf order, checked by `load_state`.
    The file name is used as given (no '.npz' is appended).
    """
    # every device copy happens before any write
    arrays = state_to_numpy(state, opt, extra, leaf_names)
    write_atomic(path, arrays)


def load_state(path, like: Any = None, opt=None, leaf_names: list[str] | None = None,
               allow_changed: Collection[str] = (), spelled: Mapping[str, str] | None = None):
    """A new state read from `path`, as arrays of `like`'s library, device and dtypes.

    like: a template state of the target backend, e.g. `opt.init(params)` there; its
    containers, shapes and dtypes must match the file (dtypes may differ in precision only:
    float64 -> float32 casts). None returns NumPy arrays in the saved structure.
    opt: when given, the file's optimizer name and hyperparameters must equal `opt`'s, but
    those named in `allow_changed` (e.g. ("lr",): resume with another learning rate; names
    as an adapter spells them, `spelled`: {core name: adapter name}).
    leaf_names: the params leaves' names in leaf order; the same names as the file's in
    another order are refused (the state is kept per position).
    Raises ValueError for a corrupted, mismatched, newer-format or pickle-holding file;
    `like` is never modified.
    """
    arrays = read_archive(path)
    return state_from_numpy(arrays, like, opt, source=f"checkpoint {os.fspath(path)!r}",
                            leaf_names=leaf_names,
                            check=OptCheck(tuple(allow_changed), tuple((spelled or {}).items())))
