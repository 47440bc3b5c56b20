"""What an optimizer needs the adapter to collect, from its hyperparameters (§1, §2)."""

from __future__ import annotations

from grng_core.config import Config, is_static_zero, uses_estimator
from grng_core.types import Requirements


def requirements(config: Config) -> Requirements:
    """Static needs: K-FAC rows, per-example gradients, the oracle, the Fisher's labels."""
    s = config.structure
    gr_on = uses_estimator(config)
    # the diagonal's q is a mean of squared per-example gradients; with the "mc" Fisher they
    # must come from sampled labels, so the adapter supplies them (g ⊙ g would be empirical)
    per_example = s == "woodbury" or (s == "diagonal" and config.fisher == "mc")
    gr = getattr(config, "gr", None)
    return Requirements(layer_stats=s == "kfac", per_example_grads=per_example,
                        grad_fn=gr_on and gr == "finite_difference",
                        hvp_fn=gr_on and gr == "double_backprop", fisher=config.fisher,
                        layer_rows=factored_applies(config),
                        fd_rows=fd_rows_apply(config),
                        input_gram=s == "kfac" and config.algorithm != "rkalman")


def factored_applies(config: Config) -> bool:
    """K-FAC's factored form can serve (§2.1): the preconditioned vector is the batch gradient
    g (RING; RENG and R-Kalman with the constant ρ = 0) and the statistics' rows are the
    gradient's own (the empirical Fisher)."""
    return (config.structure == "kfac" and config.fisher == "empirical"
            and (config.algorithm == "ring" or is_static_zero(config.rho)))


def fd_rows_apply(config: Config) -> bool:
    """A finite-difference ĝ = Σ cᵢ gᵢ over passes whose rows the adapter can keep is a
    product of stacked rows (§1, §2.1): K-FAC with the empirical Fisher (the batch's own rows
    are the gradient's) and ρ not the constant 0."""
    return (config.structure == "kfac" and config.fisher == "empirical"
            and uses_estimator(config) and getattr(config, "gr", None) == "finite_difference")


def stacked_passes(config: Config) -> int:
    """The gradient passes whose rows the factored form stacks (§2.1): 1 (g itself), 2 for a
    forward or backward finite-difference ĝ (`fd_rows_apply`), 3 for a central one."""
    if not fd_rows_apply(config):
        return 1
    return 3 if getattr(config, "fd_scheme", None) == "central" else 2
