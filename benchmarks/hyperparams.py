"""Hyperparameters shared by the suite's optimizer rows: the sweep grids, the refresh interval,
EMA decay, momentum and base values common to every K-FAC-type method, and the GRNG rows' base
values (the torch rows, the JAX rows and the step-cost microbenchmark all read them here)."""

from __future__ import annotations

# lr and damping sweeps: the same multiplicative grid around each optimizer's base value.
SWEEPS = {
    "quick": {"lr": (1.0,), "damping": (1.0,)},
    "default": {"lr": (1 / 3, 1.0, 3.0), "damping": (0.1, 1.0, 10.0)},
    "full": {"lr": (1 / 3, 1.0, 3.0), "damping": (0.1, 1.0, 10.0)},
}

#: Refresh interval of curvature and inverses for every K-FAC-type method (GRNG, ASDL, kfac-jax).
REFRESH_EVERY = 10
#: EMA decay of curvature factors for every K-FAC-type method.
EMA_DECAY = 0.95
#: Momentum used by every SGD-type method (SGD, SAM's base SGD, ASDL K-FAC's SGD, GRNG).
MOMENTUM = 0.9
#: Base lr and damping of every K-FAC-type method (GRNG, NGD, ASDL K-FAC, kfac-jax): the same
#: sweep grid for all of them.
KFAC_LR, KFAC_DAMPING = 0.1, 0.3
#: AdamW weight decay (torch and optax alike).
ADAMW_WD = 1e-4


#: The KL trust region of the GRNG rows: off (inf, which every adapter reads as off), as in the
#: K-FAC peers they are compared with at the same base settings and sweep, and as when the
#: README's suite and step-cost figures were made; the recommended defaults (kl_clip 1e-3) are
#: measured by benchmarks/defaults_sweep.py.
KL_CLIP = float("inf")


def common_hp(lr: float, damping: float) -> dict:
    """Keyword arguments every GRNG optimizer shares (refresh intervals with no warm-up, as
    the K-FAC peers refresh, EMA, momentum, the KL trust region)."""
    return {"lr": lr, "damping": damping, "momentum": MOMENTUM,
            "curvature_every": REFRESH_EVERY, "inverse_every": REFRESH_EVERY,
            "refresh_warmup": 0, "ema_decay": EMA_DECAY, "kl_clip": KL_CLIP}


#: RING's two forms, each run as its own row (adaptive_damping: the default form).
RING_FORMS = ("adaptive_damping", "gauss_newton")
#: Key suffix of a RING gauss_newton row: its adaptive_damping twin's key + this.
GN_SUFFIX = "_gn"

#: Base values of the GRNG rows (the sweep multiplies lr and damping around them).
GRNG_BASE = {
    "reng": dict(common_hp(KFAC_LR, KFAC_DAMPING), rho=0.05),
    "ring": dict(common_hp(KFAC_LR, KFAC_DAMPING), rho=0.05),
    "ngd": common_hp(KFAC_LR, KFAC_DAMPING),
    "rkalman": dict(common_hp(KFAC_LR, KFAC_DAMPING), rho=0.05, prior_var=1.0,
                    kalman_decay=0.95),
}
