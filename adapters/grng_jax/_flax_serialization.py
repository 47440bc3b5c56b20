"""``flax.serialization`` (``to_bytes`` / ``from_bytes``, ``TrainState`` checkpoints) for a
state holding K-FAC layers: their `LayerLayout` (static: leaf positions and sizes, no arrays) is
written as a dict of its fields and, on restore, checked against the template's and kept.

Registered when flax is already imported (at ``import grng_jax`` and at every ``init``), so a
JAX user without flax never imports it."""

from __future__ import annotations

import dataclasses
import sys

from grng_core.state import LayerLayout

_registered = False


def _to_state_dict(layout: LayerLayout) -> dict:
    return dataclasses.asdict(layout)


def _from_state_dict(target: LayerLayout, state: dict) -> LayerLayout:
    mine = dataclasses.asdict(target)
    if dict(state) != mine:
        raise ValueError(f"the checkpoint's K-FAC layer {dict(state)} is not the template's "
                         f"{mine}: restore into a state the same optimizer built for the same "
                         "model (opt.init(params))")
    return target


def register_if_flax() -> None:
    """Register `LayerLayout` with flax.serialization once, if flax is imported."""
    global _registered
    if _registered or "flax" not in sys.modules:
        return
    from flax import serialization

    serialization.register_serialization_state(LayerLayout, _to_state_dict, _from_state_dict,
                                               override=True)
    _registered = True
