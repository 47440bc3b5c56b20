"""One param group's state and core optimizer: what `opt.state[first_param]["grng"]` holds.

`GroupState(host_step, core)`: the core's typed state (`grng_core.OptState`) and the host step
counter (calls of `step`, kept as a Python int so that refresh flags need no device read).
The structure the group runs is kept beside it; its K-FAC layers are the core state's layouts.
`encode` / `decode` turn it into the plain-dict form a torch `state_dict` carries (tensors
only, so `torch.load(weights_only=True)` reads it; the same layout as checkpoint format 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from grng_core import codec
from grng_core.state import OptState, layouts

STATE_KEY = "grng"


class GroupState(NamedTuple):
    """A param group's optimizer state: host step counter, the structure it runs (the
    group's, or "diagonal" for a "kfac" group whose model had no K-FAC layer:
    `grng_core.Optimizer.resolve`), and the core state."""

    host_step: int
    structure: str
    core: OptState

    @property
    def layers(self) -> list[list]:
        """[[weight position, bias position or None], ...] of the group's K-FAC layers."""
        return [[L.weight, L.bias] for L in layouts(self.core)]


def encode(entry: GroupState) -> dict[str, Any]:
    """The state_dict form: {"step", "structure", "layers", "core": portable tree}."""
    return {"step": entry.host_step, "structure": entry.structure, "layers": entry.layers,
            "core": codec.encode(entry.core)}


def decode(blob: dict[str, Any], template: OptState) -> GroupState:
    """The GroupState of a state_dict entry, typed like `template` (this model's init)."""
    return GroupState(host_step=int(blob["step"]), structure=str(blob["structure"]),
                      core=codec.decode(blob["core"], template))
