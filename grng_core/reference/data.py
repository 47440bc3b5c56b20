"""Data for the reference model: the digits split and ill-conditioned synthetic problems (NumPy).

Targets are 2-D to fit `MLP`: one-hot (n, C) for classification, (n, 1) for regression.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DigitsSplit(NamedTuple):
    """sklearn's 8x8 digits, features scaled to [0, 1], split stratified by class."""

    x_train: np.ndarray  # (n_train, 64) float64
    y_train: np.ndarray  # (n_train, 10) one-hot float64
    x_test: np.ndarray
    y_test: np.ndarray
    labels_train: np.ndarray  # (n_train,) int64
    labels_test: np.ndarray


class LeastSquares(NamedTuple):
    """L(w) = ‖x w - y‖² / (2n), the mean `mse` loss of MLP((d, 1), loss="mse", bias=False)."""

    x: np.ndarray  # (n, d)
    y: np.ndarray  # (n, 1)
    w_opt: np.ndarray  # (d, 1): the closed-form minimiser (the MLP weight is w_opt.T)
    loss_opt: float  # L(w_opt)
    w_true: np.ndarray  # (d, 1): the weights the targets were made from


class Logistic(NamedTuple):
    """Binary logistic regression as a 2-class softmax: y one-hot (n, 2), labels (n,)."""

    x: np.ndarray  # (n, d)
    y: np.ndarray  # (n, 2) one-hot float64
    labels: np.ndarray  # (n,) int64 in {0, 1}
    w_true: np.ndarray  # (d,): P(label = 1 | x) = sigmoid(x @ w_true)


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float64)[labels]


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """sklearn's digits (1797 x 64), pixels / 16, a seeded stratified train/test split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float64) / 16.0
    labels = np.asarray(data.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: int(round(test_fraction * idx.size))]] = True
    tr, te = rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))
    n_classes = int(labels.max()) + 1
    return DigitsSplit(x[tr], _one_hot(labels[tr], n_classes), x[te],
                       _one_hot(labels[te], n_classes), labels[tr], labels[te])


def _design(n: int, d: int, cond: float, rng: np.random.Generator):
    """x = U diag(σ) Vᵀ with the eigenvalues of xᵀx/n log-uniform in [1/cond, 1]."""
    if d < 1 or n < d:
        raise ValueError(f"need n >= d >= 1, got n={n}, d={d}")
    if not cond >= 1.0:
        raise ValueError(f"cond must be >= 1, got {cond}")
    if d == 1 and cond != 1.0:
        raise ValueError(f"with d=1 the condition number is 1, got cond={cond}")
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sigma = np.sqrt(n * np.geomspace(1.0, 1.0 / cond, d))
    return (u * sigma) @ v.T, u, sigma, v


def least_squares_optimum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(w_opt, loss_opt) minimising ‖x w - y‖² / (2n), by an SVD (closed form)."""
    w_opt = np.linalg.lstsq(x, y, rcond=None)[0]
    r = x @ w_opt - y
    return w_opt, float(np.sum(r * r) / (2 * x.shape[0]))


def ill_conditioned_least_squares(n: int, d: int, cond: float, seed: int = 0,
                                  noise: float = 0.1) -> LeastSquares:
    """y = x w_true + noise·ε, with cond(xᵀx/n) = cond; w_opt = V diag(1/σ) Uᵀ y exactly."""
    rng = np.random.default_rng(seed)
    x, u, sigma, v = _design(n, d, cond, rng)
    w_true = rng.standard_normal((d, 1))
    y = x @ w_true + noise * rng.standard_normal((n, 1))
    w_opt = v @ ((u.T @ y) / sigma[:, None])
    r = x @ w_opt - y
    return LeastSquares(x, y, w_opt, float(np.sum(r * r) / (2 * n)), w_true)


def ill_conditioned_logistic(n: int, d: int, cond: float, seed: int = 0,
                             scale: float = 3.0) -> Logistic:
    """Labels ~ Bernoulli(sigmoid(x w_true)), cond(xᵀx/n) = cond, ‖w_true‖ = scale."""
    rng = np.random.default_rng(seed)
    x, *_ = _design(n, d, cond, rng)
    w_true = rng.standard_normal(d)
    w_true *= scale / np.linalg.norm(w_true)
    p = 1.0 / (1.0 + np.exp(-(x @ w_true)))
    labels = (rng.random(n) < p).astype(np.int64)
    return Logistic(x, _one_hot(labels, 2), labels, w_true)
