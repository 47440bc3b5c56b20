"""Reference model for tests and demos: a hand-written array-API MLP and its data.

`MLP` computes losses, gradients, per-example gradients, K-FAC layer statistics and exact
Hessian-vector products by hand (no autodiff), for any array-API library and device.
"""

from grng_core.reference.arrays import from_numpy, to_numpy
from grng_core.reference.data import (
    DigitsSplit,
    LeastSquares,
    Logistic,
    ill_conditioned_least_squares,
    ill_conditioned_logistic,
    least_squares_optimum,
    load_digits_split,
)
from grng_core.reference.mlp import MLP, Batch

__all__ = [
    "MLP",
    "Batch",
    "DigitsSplit",
    "LeastSquares",
    "Logistic",
    "from_numpy",
    "ill_conditioned_least_squares",
    "ill_conditioned_logistic",
    "least_squares_optimum",
    "load_digits_split",
    "to_numpy",
]
