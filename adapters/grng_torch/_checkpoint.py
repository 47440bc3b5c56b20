"""Portable checkpoints of the torch optimizers: `opt.save(path)` / `opt.load(path)`.

The file is `grng_core.checkpoint`'s framework-neutral ``.npz`` (no pickle, atomic write,
format version, optimizer name and hyperparameters in the metadata); the torch specifics
(host step counter, K-FAC layer positions, the group's own structure) go into the
metadata's ``extra`` entry, which other backends ignore.

Layouts
-------
- One param group (``len(opt.param_groups) == 1``) or ``save(path, group=k)``: the file
  holds exactly that group's core state, saved with its core optimizer (``opt.core(k)``), so
  ``grng_core.load_state(path, like=core.init(params), opt=core)`` reads it into NumPy, JAX,
  CuPy, ... where the core (or an adapter built on it) continues. Its ``extra`` is
  ``{"adapter": "grng_torch", "algorithm": ..., "layout": "single", "groups": [info]}``.
- Several param groups: the state is ``{"groups": [state_0, state_1, ...]}`` (``None`` for a
  group without parameters), saved without a top-level optimizer (the groups' hyperparameters
  may differ); ``extra`` is ``{"adapter": "grng_torch", "algorithm": ..., "layout": "groups",
  "groups": [info_0, info_1, ...]}`` with, per group, ``info = {"optimizer", "hyperparams",
  "structure", "group_structure", "layers", "host_step"}``. Moving such a file to another
  framework is per group: `extract_group(src, k, dest)` writes group k as a single-group file,
  or ``grng_core.load_state(path)["groups"][k]`` gives its NumPy arrays.

Loading accepts both layouts, and a core-state file written by any backend (the core's
``save_state(path, state, opt=opt)``, grng_cupy's ``save``, ...): the host step counter is
``step + skipped`` of the state, and for structure="kfac" the state's layer keys (``"w/b/N"``,
positions in the group's parameter list) must name ``nn.Linear`` / ``nn.Conv2d`` weights (and
their biases) of the optimizer's model; before the first step those layers are registered from
the file, afterwards they must equal the layers the optimizer registered.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import grng_core as gc
from grng_core import checkpoint
from grng_core.config import TITLES as _TITLES
from grng_core.state import host_step
from grng_torch._groups import GroupState

ADAPTER = "grng_torch"

__all__ = ["extract_group", "load", "save"]


class _Recorded:
    """An optimizer as a checkpoint records it (name and JSON hyperparameters)."""

    def __init__(self, name: str, hyperparams: dict):
        self.name = name
        self.config = self
        self._hyperparams = hyperparams

    def as_dict(self) -> dict:
        return self._hyperparams


# ------------------------------------------------------------------------- save
def _group_info(core: gc.Optimizer, group: dict, entry: GroupState) -> dict:
    return {"optimizer": core.name, "hyperparams": checkpoint.hyperparams_json(core),
            "structure": entry.structure, "group_structure": group["structure"],
            "layers": [list(x) for x in entry.layers], "host_step": int(entry.host_step)}


def _group_payload(opt, i: int):
    """(core state, info) of group i; (None, None) for a group without parameters."""
    group = opt.param_groups[i]
    if not group["params"]:
        return None, None
    entry = opt.group_state(i)
    if entry is None:  # the state a first step would start from
        entry, core = opt.fresh_group_state(i)
    else:
        core = opt.core(i)
    return entry.core, _group_info(core, group, entry)


def save(opt, path, group: int | None = None) -> None:
    n = len(opt.param_groups)
    extra: dict[str, Any] = {"adapter": ADAPTER, "algorithm": opt.algorithm}
    if group is not None or n == 1:
        i = 0 if group is None else _index(group, n)
        state, info = _group_payload(opt, i)
        if state is None:
            raise ValueError(f"param group {i} has no parameters: nothing to save")
        extra.update(layout="single", group=i, groups=[info])
        checkpoint.save_state(path, state, _Recorded(info["optimizer"], info["hyperparams"]),
                              extra=extra)
        return
    payloads = [_group_payload(opt, i) for i in range(n)]
    extra.update(layout="groups", groups=[info for _, info in payloads])
    checkpoint.save_state(path, {"groups": [s for s, _ in payloads]}, None, extra=extra)


def _index(group, n: int) -> int:
    if isinstance(group, bool) or not isinstance(group, int) or not -n <= group < n:
        raise ValueError(f"group={group!r}: this optimizer has {n} param group(s)")
    return group % n


def extract_group(src, index: int, dest) -> None:
    """Write param group `index` of a multi-group grng_torch checkpoint `src` to `dest` as a
    single-group file: exactly that group's core state with its optimizer and hyperparameters,
    which `grng_core.load_state(dest, like=..., opt=...)` loads into any backend."""
    meta = checkpoint.read_metadata(src)
    extra = meta.get("extra") or {}
    if extra.get("adapter") != ADAPTER or extra.get("layout") != "groups":
        raise ValueError(f"checkpoint {os.fspath(src)!r} is not a multi-group grng_torch "
                         "checkpoint (a single-group file is already portable as it is)")
    infos = _infos(extra, src)
    i = _index(index, len(infos))
    state = checkpoint.load_state(src)["groups"][i]
    if state is None or infos[i] is None:
        raise ValueError(f"param group {i} of {os.fspath(src)!r} has no parameters")
    info = infos[i]
    checkpoint.save_state(dest, state, _Recorded(info["optimizer"], info["hyperparams"]),
                          extra={"adapter": ADAPTER, "algorithm": extra.get("algorithm"),
                                 "layout": "single", "group": i, "groups": [info]})


# ------------------------------------------------------------------------- load
def _infos(extra: dict, source) -> list:
    infos = extra.get("groups")
    if not isinstance(infos, list) or not all(x is None or isinstance(x, dict) for x in infos):
        raise ValueError(f"checkpoint {os.fspath(source)!r}: corrupted grng_torch metadata "
                         "(extra['groups'])")
    return infos


def _dict_node(node, source, where: str) -> dict:
    """{key: node} of a dict node of the metadata's structure."""
    if not isinstance(node, dict) or not isinstance(node.get("dict"), list):
        raise ValueError(f"{source}: the state at {where!r} is not a dict of arrays: not an "
                         "optimizer state")
    try:
        return {k: v for k, v in node["dict"]}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: corrupted structure at {where!r}") from e


def _kfac_keys(node, source, where: str) -> list[str]:
    sub = _dict_node(node, source, where).get("kfac")
    if sub is None:
        return []
    return [str(k) for k in _dict_node(sub, source, f"{where}/kfac")]


def _parse_layer(key: str, source) -> tuple[int, int | None, str]:
    """(weight, bias, layout) of a K-FAC layer key 'weight/bias/layout' (`grng_core.codec`:
    layout "N" or "T", the weight stored (out, in) or (in, out), with "D" for an embedding's
    diagonal A)."""
    parts = key.split("/")
    try:
        if len(parts) != 3 or parts[2] not in ("N", "T", "ND", "TD"):
            raise ValueError
        w, b = int(parts[0]), None if parts[1] == "-" else int(parts[1])
    except ValueError:
        raise ValueError(f"{source}: K-FAC layer key {key!r} is not 'weight/bias/N' "
                         "(corrupted checkpoint)") from None
    return w, b, parts[2]


def _check_layouts(opt, i: int, parsed, found, source) -> None:
    """Each saved layer's layout is the matched hooked layer's: its weight's orientation (a
    JAX/Flax kernel is stored (in, out), a torch Linear's (out, in); an nn.Embedding's table is
    (vocab, dim)) and whether its A is diagonal (an embedding)."""
    layers = opt.collector.layers
    for (w, b, layout), (li, _, _) in zip(parsed, found, strict=True):
        L = layers[li]
        want = ("T" if L.transposed else "N") + ("D" if L.a_diagonal else "")
        if layout != want:
            raise ValueError(
                f"{source}: param group {i}: the K-FAC layer {w}/{'-' if b is None else b} "
                f"was saved with layout {layout!r} but this model's layer {L.label!r} is "
                f"{want!r} ('T': weight stored (in, out), as JAX/Flax kernels are; 'D': an "
                "embedding): the state does not fit this model's layout")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Plan:
    """Everything needed to load one group, computed without touching the optimizer."""

    def __init__(self, i: int, j: int):
        self.i, self.j = i, j  # optimizer group, file group
        self.group: dict = {}
        self.structure = ""
        self.layers: list[list] = []
        self.core: gc.Optimizer | None = None
        self.template: Any = None


def _recorded_hyperparams(opt, info: dict, source: str) -> dict:
    title = type(opt).__name__
    if info.get("optimizer") is None:
        raise ValueError(f"{source}: the checkpoint records no optimizer (saved without opt=); "
                         f"save it with grng_core.save_state(path, state, opt=opt) to load it "
                         f"into a {title}")
    if info["optimizer"] != opt.algorithm:
        raise ValueError(f"{source}: checkpoint is for optimizer {info['optimizer']!r}, "
                         f"loading into {opt.algorithm!r} ({title})")
    saved_hp = info.get("hyperparams")
    if not isinstance(saved_hp, dict):
        raise ValueError(f"{source}: corrupted hyperparameters in the metadata")
    return saved_hp


def _group_values(opt, group: dict, saved_hp: dict, set_hyperparams: bool) -> dict:
    """The group's values; with set_hyperparams the numbers the file recorded (e.g. a
    scheduler's lr) replace the group's."""
    new_group = dict(group)
    if set_hyperparams:
        for k in opt.hp_names:
            v, cur = saved_hp.get(k), group[k]
            cur_number = _number(cur) or (isinstance(cur, torch.Tensor) and cur.dim() == 0)
            if _number(v) and cur_number:
                new_group[k] = v if not isinstance(cur, torch.Tensor) else \
                    torch.as_tensor(v, dtype=cur.dtype, device=cur.device)
    return new_group


def _plan_core(opt, i: int, info: dict, saved_hp: dict, new_group: dict, source: str):
    """The core optimizer the file's state belongs to, with the hyperparameters checked."""
    group, entry = opt.param_groups[i], opt.group_state(i)
    # a "kfac" group runs "diagonal" when it has no K-FAC layer (as at its first step), so
    # such a state fits a "kfac" group too
    override = None
    if group["structure"] == "kfac" and saved_hp.get("structure") == "diagonal" and (
            info.get("group_structure") == "kfac" or not opt.layer_candidates(i)
            or (entry is not None and entry.structure == "diagonal")):
        override = "diagonal"
    try:
        core = opt.build_core(new_group, override)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: param group {i}: the checkpoint's hyperparameters are not "
                         f"valid for {type(opt).__name__}: {e}") from e
    diff = checkpoint.hyperparams_diff(opt.algorithm, saved_hp,
                                       checkpoint.hyperparams_json(core))
    if diff:
        raise ValueError(f"{source}: param group {i}: checkpoint hyperparameters differ from "
                         f"the optimizer's ({'; '.join(diff)}); load(path, "
                         "set_hyperparams=True) takes the file's, after which a param "
                         "group's lr can be set")
    return core


def _plan_layers(opt, i: int, j: int, node, structure: str, source: str) -> list:
    """The file's K-FAC layers, which must be this model's (and the registered ones)."""
    entry = opt.group_state(i)
    if structure != "kfac":
        if entry is not None and entry.structure != structure:
            raise ValueError(f"{source}: param group {i}: the checkpoint's structure is "
                             f"{structure!r}, this optimizer runs {entry.structure!r}")
        return []
    keys = _kfac_keys(node, source, "<root>" if j < 0 else f"groups/{j}")
    parsed = sorted(_parse_layer(k, source) for k in keys)
    layers = [(w, b) for w, b, _ in parsed]
    try:
        found = opt.match_layers(i, layers)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    _check_layouts(opt, i, parsed, found, source)
    if entry is not None:
        have = sorted((w, b) for w, b in entry.layers)
        if have != layers:
            raise ValueError(
                f"{source}: param group {i}: the checkpoint's K-FAC layers (weight, bias "
                f"positions) {layers} differ from the layers this optimizer registered {have}")
    return layers


def _plan_group(opt, i: int, j: int, node, info: dict, source: str,
                set_hyperparams: bool) -> _Plan:
    plan = _Plan(i, j)
    saved_hp = _recorded_hyperparams(opt, info, source)
    new_group = _group_values(opt, opt.param_groups[i], saved_hp, set_hyperparams)
    core = _plan_core(opt, i, info, saved_hp, new_group, source)
    structure = core.config.structure
    layers = _plan_layers(opt, i, j, node, structure, source)
    specs = opt.layer_specs(opt.match_layers(i, layers)) if structure == "kfac" else None
    params = [p.detach() for p in opt.param_groups[i]["params"]]
    try:
        with torch.no_grad():
            template = core.init(params, layers=specs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: param group {i}: the checkpoint's layout does not fit this "
                         f"model: {e}") from e
    plan.group, plan.structure, plan.core, plan.template = new_group, structure, core, template
    plan.layers = [[w, b] for w, b in layers]
    return plan


def _file_groups(opt, meta: dict, extra: dict, group, source: str, path):
    """(infos, structure nodes, (optimizer group, file group) pairs, multi) of a file."""
    title, n = type(opt).__name__, len(opt.param_groups)
    if extra.get("adapter") == ADAPTER and extra.get("layout") == "groups":
        infos = _infos(extra, path)
        root = _dict_node(meta["structure"], source, "<root>")
        nodes = root.get("groups", {}).get("list") if isinstance(root.get("groups"), dict) \
            else None
        if set(root) != {"groups"} or not isinstance(nodes, list) or len(nodes) != len(infos):
            raise ValueError(f"{source}: corrupted multi-group checkpoint")
        if group is None:
            if len(infos) != n:
                raise ValueError(f"{source} holds {len(infos)} param groups, this {title} has "
                                 f"{n}; load one with load(path, group=k)")
            return infos, nodes, list(zip(range(n), range(n))), True
        i = _index(group, n)
        if i >= len(infos):
            raise ValueError(f"{source} holds {len(infos)} param groups: no group {i}")
        return infos, nodes, [(i, i)], True
    if group is None and n != 1:
        raise ValueError(f"{source} holds one param group's state, this {title} has {n} "
                         "param groups: choose one with load(path, group=k)")
    i = 0 if group is None else _index(group, n)
    info = {"optimizer": meta.get("optimizer"), "hyperparams": meta.get("hyperparams")}
    saved = (extra.get("groups") or [None])[0] if extra.get("adapter") == ADAPTER else None
    if isinstance(saved, dict) and saved.get("group_structure") is not None:
        info["group_structure"] = saved["group_structure"]
    return [info], [meta["structure"]], [(i, 0)], False


def _plans(opt, infos, nodes, pairs, multi, source, set_hyperparams) -> list[_Plan]:
    title = type(opt).__name__
    plans = []
    for i, j in pairs:
        has_params = bool(opt.param_groups[i]["params"])
        if infos[j] is None or nodes[j] == {"none": True}:
            if has_params:
                raise ValueError(f"{source}: param group {j} of the file has no state, param "
                                 f"group {i} of this {title} has parameters")
            continue
        if not has_params:
            raise ValueError(f"{source}: param group {i} of this {title} has no parameters, "
                             f"the file has a state for it")
        plans.append(_plan_group(opt, i, j if multi else -1, nodes[j], infos[j], source,
                                 set_hyperparams))
    return plans


def load(opt, path, group: int | None = None, set_hyperparams: bool = False) -> None:
    source = f"checkpoint {os.fspath(path)!r}"
    meta = checkpoint.read_metadata(path)
    found = meta.get("extra")
    extra: dict = found if isinstance(found, dict) else {}
    if extra.get("adapter") == ADAPTER and extra.get("algorithm") not in (None, opt.algorithm):
        algorithm = extra.get("algorithm")
        raise ValueError(f"{source} is from grng_torch.{_TITLES.get(str(algorithm), algorithm)}, "
                         f"not {type(opt).__name__}")
    infos, nodes, pairs, multi = _file_groups(opt, meta, extra, group, source, path)
    plans = _plans(opt, infos, nodes, pairs, multi, source, set_hyperparams)
    if not plans:
        return
    # read the arrays into templates on the parameters' devices (ValueError on any mismatch)
    if multi:
        like: dict[str, list] = {"groups": [None] * len(infos)}
        for p in plans:
            like["groups"][p.j] = p.template
        loaded = checkpoint.load_state(path, like=like)["groups"]
        states = [loaded[p.j] for p in plans]
    else:
        states = [checkpoint.load_state(path, like=plans[0].template, opt=plans[0].core)]
    entries = [GroupState(host_step(state), p.structure, state) for p, state in zip(plans, states)]
    # commit: nothing above changed the optimizer
    for p, entry in zip(plans, entries):
        if set_hyperparams:
            for k in opt.hp_names:
                opt.param_groups[p.i][k] = p.group[k]
        opt.set_group_state(p.i, entry)
        opt.loaded_groups.add(p.i)
