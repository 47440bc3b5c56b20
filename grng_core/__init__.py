"""grng_core: gradient-regularized natural-gradient optimizers over the Python array API.

RENG, RING and R-Kalman (ALGORITHMS.md §3) as pure `init` / `update` functions that work on
any array library array-api-compat supports (NumPy, CuPy, PyTorch, JAX, array-api-strict)
and trace under `jax.jit`::

    import grng_core as gc
    opt = gc.ring(lr=0.1, rho=0.05, damping=1e-3, structure="woodbury")
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, stats=stats, oracle=oracle)
    params = gc.apply_updates(params, updates)
"""

from grng_core._version import __version__
from grng_core.algorithms import reng, ring, rkalman
from grng_core.apply import apply_updates
from grng_core.checkpoint import load_state, read_metadata, save_state
from grng_core.config import RENGConfig, RINGConfig, RKalmanConfig
from grng_core.linalg import InverseError
from grng_core.optimizer import Optimizer
from grng_core.state import Belief, KfacLayer, LayerLayout, OptState, Preconditioner
from grng_core.types import (
    Collective,
    InputGram,
    LayerSpec,
    LayerStats,
    Oracle,
    Requirements,
    Stats,
    Whole,
)

__all__ = [
    "__version__",
    "Belief",
    "KfacLayer",
    "LayerLayout",
    "OptState",
    "Preconditioner",
    "RENGConfig",
    "RINGConfig",
    "RKalmanConfig",
    "Collective",
    "InputGram",
    "InverseError",
    "LayerSpec",
    "LayerStats",
    "Optimizer",
    "Oracle",
    "Requirements",
    "Stats",
    "Whole",
    "apply_updates",
    "load_state",
    "read_metadata",
    "save_state",
    "reng",
    "ring",
    "rkalman",
]
