"""The records of one torch step (`_step`): the plan of every param group and what the
step's passes share (`StepEnv`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grng_core as gc
from grng_torch._groups import GroupState


@dataclass
class GroupPlan:
    """What one param group's step uses."""

    index: int
    group: dict
    core: gc.Optimizer
    entry: GroupState | None
    curvature: bool
    inverse: bool
    layers: list  # (hooked layer number, weight position, bias position)
    offset: int = 0  # where the group starts among all parameters
    rows_only: bool = False  # no curvature update: K-FAC rows for the factored form only
    steady: tuple | None = None  # flags of the K-FAC layers that skip the warm-up (core's)


@dataclass
class StepPlan:
    groups: list[GroupPlan]
    emp: set = field(default_factory=set)  # hooked layers collected on the closure's backward
    mc: set = field(default_factory=set)  # hooked layers collected on the sampled-label pass
    # layer -> the passes whose rows its factored form stacks (1; 2 or 3 for a
    # finite-difference ĝ): collected for the factored form only
    rows_only: dict = field(default_factory=dict)
    # hooked layer -> its group's config, on a step whose refresh is the warm-up's only: the
    # hook keeps no rows where one call gives the layer enough to skip it (`layer_warms`)
    warmup_only: dict = field(default_factory=dict)
    grams: dict = field(default_factory=dict)  # convolution -> dtype: `gram_layers`
    pe: dict = field(default_factory=lambda: {"empirical": [], "mc": []})
    hvp: bool = False
    fd: bool = False
    # trainable parameters of `model=` in no param group (e.g. a tied embedding left to
    # another optimizer), on a step with extra passes: their `.grad` is kept as well
    bystanders: list = field(default_factory=list)

    @property
    def all_params(self) -> list:
        return [p for g in self.groups for p in g.group["params"]]

    @property
    def graded(self) -> list:
        """Every parameter whose `.grad` the step keeps as the closure's first pass left it:
        the groups' (first, in order), then the bystanders."""
        return self.all_params + self.bystanders


@dataclass
class StepEnv:
    """What the groups' updates read of the step beyond their own plan: the closure and what
    its re-runs restore (`_passes.grad_fn`), the double-backprop graph, the collective, the
    per-example gradients ({id(param): tensor}) and, where the optimizer has several groups,
    what reads the whole model (`_whole`; set by `_update_groups`)."""

    closure: Any
    saved_grads: list
    rng_before: Any
    devices: list
    outer_autocast: Any
    snapshot: Any
    gb: Any  # `GraphBackward` or None
    collective: Any
    pe: dict
    whole: Any = None  # `grng_core.Whole` or None (one group)
    vectors: Any = None
    hvp_cache: dict | None = None
    shared: Any = None  # `_passes.SharedPasses`
