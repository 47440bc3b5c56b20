"""Shared problems of the reliability tests (guard, degenerate curvature, properties).

The optimizer configurations are the test suites' one table (tests/cases.py: `case.bare.build(
**hp)` makes the core optimizer). A `Problem` is the reference MLP on one backend and dtype;
`problem.inputs(opt, params)` returns what one `update` call needs (grads, stats, oracle) for
that optimizer.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_ENABLE_X64", "1")

from dataclasses import dataclass, field
from typing import Any

import numpy as np

import grng_core as gc
from grng_core.reference import MLP
from tests.backends import BACKEND_NAMES, Backend, get_backend


def backend(name: str) -> Backend:
    return get_backend(name)


def available_backends() -> list[str]:
    return list(BACKEND_NAMES)


@dataclass
class Problem:
    """The reference MLP with one batch, on `backend`, in `dtype`."""

    mlp: MLP
    x_np: np.ndarray
    y_np: np.ndarray
    params_np: list
    be: Backend
    dtype: str = "float64"
    _cache: dict = field(default_factory=dict)

    @classmethod
    def make(cls, be: Backend | str = "numpy", dtype="float64", sizes=(4, 6, 3), batch=8,
             activation="tanh", loss="softmax_ce", bias=True, seed=0, x_scale=1.0,
             param_scale=1.0) -> Problem:
        be = get_backend(be) if isinstance(be, str) else be
        mlp = MLP(sizes, activation=activation, loss=loss, bias=bias)
        rng = np.random.default_rng(seed)
        x = x_scale * rng.standard_normal((batch, sizes[0]))
        if loss == "softmax_ce":
            y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], batch)]
        else:
            y = rng.standard_normal((batch, sizes[-1]))
        params = [param_scale * p for p in mlp.init(seed)]
        return cls(mlp, x, y, params, be, dtype)

    @property
    def x(self):
        return self.be.asarray(self.x_np, self.dtype)

    @property
    def y(self):
        return self.be.asarray(self.y_np, self.dtype)

    def params(self):
        return [self.be.asarray(p, self.dtype) for p in self.params_np]

    def layer_specs(self) -> list:
        return [gc.LayerSpec(*self.mlp.layer_keys(k)) for k in range(self.mlp.n_layers)]

    def init(self, opt: gc.Optimizer, params=None):
        params = self.params() if params is None else params
        layers = self.layer_specs() if opt.config.structure == "kfac" else None
        return opt.init(params, layers=layers)

    def inputs(self, opt: gc.Optimizer, params, x=None, y=None):
        """(grads, stats, oracle) for one update of `opt` at `params`."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        req = opt.requirements
        b = self.mlp.batch(params, x, y, per_example=req.per_example_grads,
                           layer_stats=req.layer_stats)
        stats = gc.Stats(per_example_grads=b.per_example_grads, layers=b.layers)
        return b.grads, stats, self.mlp.oracle(x, y)

    def step(self, opt, params, state, **kw):
        grads, stats, oracle = self.inputs(opt, params)
        updates, state = opt.update(grads, state, params, stats=stats, oracle=oracle, **kw)
        return gc.apply_updates(params, updates), state, updates


def leaves(tree) -> list:
    """Arrays of a nested dict/list/tuple state (typed states through their portable tree),
    in a fixed order."""
    if isinstance(tree, gc.OptState):
        tree = gc.codec.encode(tree)
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def paths(tree, prefix="") -> list[str]:
    if isinstance(tree, gc.OptState):
        tree = gc.codec.encode(tree)
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [p for k in sorted(tree) for p in paths(tree[k], f"{prefix}/{k}")]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in paths(v, f"{prefix}[{i}]")]
    return [prefix]


def to_np(x) -> np.ndarray:
    from grng_core.reference import to_numpy

    return np.asarray(to_numpy(x))


def signature(tree) -> list[tuple[str, tuple, str]]:
    """(path, shape, dtype) of every array of a state."""
    return [(p, tuple(x.shape), str(x.dtype)) for p, x in zip(paths(tree), leaves(tree))]


def snapshot(tree) -> list[np.ndarray]:
    """NumPy copies of every array (bitwise comparison later)."""
    return [to_np(x).copy() for x in leaves(tree)]


def same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
        for x, y in zip(a, b))


def all_finite(tree) -> bool:
    return all(np.all(np.isfinite(to_np(x))) for x in leaves(tree)
               if np.issubdtype(to_np(x).dtype, np.floating))


def with_value(be: Backend, arr, value: float, index: tuple) -> Any:
    """A copy of `arr` with one entry set to `value` (NaN, +Inf, -Inf), same dtype."""
    a = to_np(arr).copy()
    a[index] = value
    return be.asarray(a, str(a.dtype))


# ------------------------------------------------------------------ degenerate curvature
CASES = ("zero_inputs", "dead_relu", "batch_lt_width", "params_1e-6", "params_1e6")


def degenerate_problem(case, backend="numpy", dtype="float64") -> Problem:
    sizes, batch, act = (5, 8, 3), 6, "tanh"
    if case == "batch_lt_width":
        sizes, batch = (5, 24, 3), 2
    if case == "dead_relu":
        act = "relu"
    pr = Problem.make(backend, dtype, sizes=sizes, batch=batch, activation=act, seed=3)
    if case == "zero_inputs":
        pr.x_np = np.zeros_like(pr.x_np)
    elif case == "dead_relu":
        pr.params_np[1] = np.full_like(pr.params_np[1], -100.0)  # every hidden unit dead
    elif case == "params_1e-6":
        pr.params_np = [1e-6 * p for p in pr.params_np]
    elif case == "params_1e6":
        pr.params_np = [1e6 * p for p in pr.params_np]
    return pr


def is_backend_linalg_error(exc) -> bool:
    """numpy.linalg.LinAlgError or torch's, i.e. not grng_core's documented InverseError."""
    name = type(exc).__name__
    return name in ("LinAlgError", "_LinAlgError") and not isinstance(exc, gc.InverseError)
