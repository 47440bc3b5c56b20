"""What a direction function reads for one step (ALGORITHMS.md §1, §3): `Env`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grng_core import estimators
from grng_core.config import Config, RINGConfig, is_static_zero
from grng_core.context import StepContext
from grng_core.tree import Container, tree_inner
from grng_core.types import Stats


@dataclass(frozen=True)
class Env:
    """Everything a direction function reads for one step.

    g: the batch gradient per leaf (state dtype); per_example: per-example gradients or None;
    rho, damping: their values at this step; curvature_count: curvature updates including
    this step's; whole_sq_norm: ‖g‖² of the whole model where this is one part of it
    (`grng_core.types.Whole`), else None.
    """

    config: Config
    ctx: StepContext
    container: Container
    params: list
    g: list
    per_example: list | None
    stats: Stats
    oracle: Any
    curvature_count: Any
    rho: Any
    damping: Any
    whole_sq_norm: Any = None

    def grad_sq_norm(self):
        """‖g‖² over every leaf of the model's gradient (§3.2, §1)."""
        if self.whole_sq_norm is not None:
            return self.whole_sq_norm
        return tree_inner(self.g, self.g, self.ctx.xp)

    @property
    def h(self) -> Config:
        return self.config

    def regularized_gradient(self) -> estimators.Regularized:
        """ĝ by the configured estimator (§1); ρ = 0 (constant) needs no oracle: then ĝ is
        g itself, a single pass (the batch's own rows)."""
        h = self.config
        if is_static_zero(h.rho) or isinstance(h, RINGConfig):  # RING has no estimator
            return estimators.Regularized(self.g)
        if h.gr == "double_backprop":
            return estimators.Regularized(estimators.double_backprop(
                self.g, self.params, self.rho, self.oracle, self.container, self.ctx))
        return estimators.finite_difference(self.g, self.params, self.rho, h.fd_radius,
                                            h.fd_scheme, self.oracle, self.container,
                                            self.ctx, sq_norm=self.grad_sq_norm())
