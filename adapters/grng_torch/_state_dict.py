"""`state_dict()` / `load_state_dict()`: torch's own checkpoints of the GRNG optimizers.

Each group's `GroupState` is written in its plain-dict form (`_groups.encode`: tensors, ints
and strings only, so `torch.load(weights_only=True)` reads it) and read back into the types
a fresh state of this model has; a state dict of another shape raises ValueError saying what
does not fit, before anything is changed.
"""

from __future__ import annotations

from typing import Any

import torch

from grng_core import codec
from grng_core.config import TITLES, upgrade_saved
from grng_core.state import map_arrays
from grng_torch._groups import STATE_KEY, GroupState, decode, encode

FORMAT = 1


def save(opt, sd: dict[str, Any]) -> dict[str, Any]:
    """torch's state dict with each GroupState encoded, plus the algorithm's name."""
    state = {}
    for pid, v in sd["state"].items():
        if isinstance(v, dict) and isinstance(v.get(STATE_KEY), GroupState):
            v = {**v, STATE_KEY: encode(v[STATE_KEY])}
        state[pid] = v
    return {**sd, "state": state, STATE_KEY: {"algorithm": opt.algorithm, "format": FORMAT}}


def load(opt, state_dict: dict[str, Any], torch_load) -> None:
    title = type(opt).__name__
    state_dict = dict(state_dict)
    meta = state_dict.pop(STATE_KEY, None)
    if meta is not None and meta.get("algorithm") != opt.algorithm:
        name = meta.get("algorithm")
        raise ValueError(f"this state dict is from grng_torch.{TITLES.get(name, name)}, "
                         f"not {title}")
    saved_groups = [dict(g) for g in state_dict["param_groups"]]
    state_dict["param_groups"] = saved_groups
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                         f"this {title} has {len(opt.param_groups)}")
    blobs: dict[int, dict] = {}
    state = {}
    for pid, v in state_dict["state"].items():
        if isinstance(v, dict) and STATE_KEY in v:
            v = dict(v)
            blobs[pid] = v.pop(STATE_KEY)
        state[pid] = v
    entries = []
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        _check_group(opt, i, group, saved)
        blob = blobs.get(saved["params"][0]) if saved["params"] else None
        if blob is not None:
            entries.append((i, _entry(opt, i, saved, blob)))
    torch_load({**state_dict, "state": state})
    for i, entry in entries:
        opt.set_group_state(i, entry)
        opt.loaded_groups.add(i)
    opt._cores = [((), None)] * len(opt.param_groups)


def _check_group(opt, i: int, group: dict, saved: dict) -> None:
    """The saved group fits: every hyperparameter present (an earlier version's absent ones
    filled with what they meant then, `upgrade_saved`), the same RING form and structure
    (torch's own load would copy them into the group silently)."""
    title = type(opt).__name__
    saved.update(upgrade_saved(opt.algorithm, saved))
    missing = [n for n in opt.hp_names if n not in saved]
    if missing:
        raise ValueError(f"param group {i} of the loaded state dict lacks {title} "
                         f"hyperparameters {missing}: it is not from a {title}")
    form = group.get("form")
    if form is not None and saved.get("form") != form:
        raise ValueError(f"param group {i} of the loaded state dict is RING form="
                         f"{saved.get('form')!r}, this optimizer's is form={form!r}: build the "
                         f"optimizer with form={saved.get('form')!r} to resume it")
    if saved.get("structure") != group["structure"]:
        raise ValueError(f"param group {i} of the loaded state dict has structure="
                         f"{saved.get('structure')!r}, this optimizer's has structure="
                         f"{group['structure']!r}: the state of one structure cannot be used by "
                         f"another; build the optimizer with structure={saved.get('structure')!r}"
                         " to resume it")
    if len(saved["params"]) != len(group["params"]):
        raise ValueError(f"param group {i}: the loaded state dict has "
                         f"{len(saved['params'])} parameters, this optimizer has "
                         f"{len(group['params'])}")


def _cast_floats(tree, template):
    """Floating-point state cast to this model's state dtype where only the dtype differs (a
    float32 run resumed in float64, or back), as torch.optim casts loaded state to the
    parameters' dtype."""
    if isinstance(template, dict) and isinstance(tree, dict):
        return {k: _cast_floats(v, template[k]) if k in template else v for k, v in tree.items()}
    if (isinstance(template, (list, tuple)) and isinstance(tree, (list, tuple))
            and len(tree) == len(template)):  # other lengths: `codec.mismatch` names them
        return type(tree)(_cast_floats(a, b) for a, b in zip(tree, template))
    if (isinstance(tree, torch.Tensor) and isinstance(template, torch.Tensor)
            and tree.shape == template.shape and tree.dtype != template.dtype
            and tree.is_floating_point() and template.is_floating_point()):
        return tree.to(template.dtype)
    return tree


def _entry(opt, i: int, saved_group: dict, blob: dict) -> GroupState:
    """The saved group state, checked against a fresh one of this model and placed on the
    parameters' device."""
    group = opt.param_groups[i]
    try:
        if blob.get("structure") != group["structure"] and not (
                group["structure"] == "kfac" and blob.get("structure") == "diagonal"):
            raise ValueError(f"the state's structure is {blob.get('structure')!r}, the group's "
                             f"{group['structure']!r}")
        core = opt.build_core({**group, **{n: saved_group[n] for n in opt.hp_names}},
                              blob["structure"])
        layers = opt.match_layers(i, blob["layers"])
        specs = opt.layer_specs(layers) or None
        with torch.no_grad():
            fresh = core.init([p.detach() for p in group["params"]], layers=specs)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"the loaded state dict does not fit this optimizer (param group "
                         f"{i}): {e}") from e
    template = codec.encode(fresh)
    blob = {**blob, "core": _cast_floats(blob["core"], template)}
    problem = codec.mismatch(blob["core"], template)
    if problem:
        raise ValueError(f"the loaded state dict does not fit this optimizer (param group {i}): "
                         f"{problem} (a different model or optimizer configuration)")
    dev = group["params"][0].device
    entry = decode(blob, fresh)
    return entry._replace(core=map_arrays(lambda x, _: x.to(dev), entry.core, entry.core))
