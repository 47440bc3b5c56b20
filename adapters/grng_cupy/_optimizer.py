"""The CuPy (and NumPy) optimizer object: host bookkeeping around `grng_core`, no math here.

The user's training stack holds its parameters as a list (or tuple, or dict) of CuPy arrays
(NumPy arrays for a CPU stack) and computes its own gradients; `step` hands them to the core's
pure `update` and writes θ + u back into the user's arrays in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np

import grng_core as gc
from grng_core import checkpoint
from grng_core.tree import flatten


def _library(x) -> str | None:
    if isinstance(x, np.ndarray):
        return "numpy"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    return None


def _describe(x) -> str:
    lib = _library(x)
    if lib == "cupy":
        return f"a CuPy array on GPU {x.device.id}"
    if lib == "numpy":
        return "a NumPy array (host memory)"
    return f"a {type(x).__module__.split('.')[0]}.{type(x).__name__}"


def _where(name: str, key) -> str:
    return f"{name}[{key!r}]"


class Optimizer:
    """RENG / RING / R-Kalman for parameters held as CuPy (or NumPy) arrays.

    Build it with `grng_cupy.RENG(params, ...)`, `RING(...)` or `RKalman(...)`. `params` is a
    list, tuple or dict of arrays of one library (CuPy on one GPU, or NumPy); they are updated
    in place by `step`, so references the training stack keeps stay valid.

    Attributes: `params` (the user's container), `core` (the `grng_core.Optimizer`), `state`
    (the core state, arrays on the params' device), `t` (host step counter: calls of `step`).
    """

    def __init__(self, params, core: gc.Optimizer, layers: Sequence[gc.LayerSpec] | None = None):
        leaves, container = flatten(params)
        if not leaves:
            raise ValueError("params hold no arrays")
        self._check_params(leaves, container.keys)
        self.params = params
        self.core = core
        self.layers = None if layers is None else list(layers)
        self._container = container
        with self._device():
            self.state = core.init(params, layers=self.layers)
        self.t = 0

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_params(leaves, keys) -> None:
        first = leaves[0]
        lib = _library(first)
        if lib is None:
            raise TypeError(
                f"grng_cupy takes CuPy arrays (or NumPy arrays for a CPU stack); "
                f"{_where('params', keys[0])} is {_describe(first)}. Use grng_torch for torch "
                "tensors and grng_jax for JAX arrays")
        for k, x in zip(keys, leaves):
            if _library(x) != lib or (lib == "cupy" and x.device.id != first.device.id):
                raise TypeError(
                    f"all parameters must be arrays of one library on one device: "
                    f"{_where('params', keys[0])} is {_describe(first)}, "
                    f"{_where('params', k)} is {_describe(x)}")
            if lib == "numpy" and not x.flags.writeable:
                raise ValueError(f"{_where('params', k)} is a read-only NumPy array: the "
                                 "optimizer updates parameters in place")

    @property
    def library(self) -> str:
        """'cupy' or 'numpy': the library of the parameters (and of the state)."""
        return _library(flatten(self.params)[0][0])

    def _same_place(self, what: str, tree) -> None:
        """Arrays handed to `step` must be of the params' library and on their device."""
        if tree is None:
            return
        ref = flatten(self.params)[0][0]
        lib = _library(ref)
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for k, x in items:
            if x is None:
                continue
            ok = _library(x) == lib and (lib != "cupy" or x.device.id == ref.device.id)
            if not ok:
                fix = ("move it with cupy.asarray(...) inside `with cupy.cuda.Device(i)`"
                       if lib == "cupy" else "move it to the host with .get() (cupy) or "
                       "numpy.asarray")
                raise TypeError(
                    f"device mismatch: the parameters are {_describe(ref)} but {what}[{k!r}] is "
                    f"{_describe(x)}; {fix}")

    def _check_inputs(self, grads, stats: gc.Stats | None) -> None:
        g_leaves, g_container = flatten(grads, "grads")
        if g_container.keys != self._container.keys:
            raise ValueError(f"grads have keys {g_container.keys}, params have "
                             f"{self._container.keys}")
        self._same_place("grads", dict(zip(g_container.keys, g_leaves)))
        if stats is None:
            return
        if stats.per_example_grads is not None:
            pe, _ = flatten(stats.per_example_grads, "stats.per_example_grads")
            self._same_place("stats.per_example_grads", dict(zip(self._container.keys, pe)))
        for i, ls in enumerate(stats.layers or ()):
            self._same_place(f"stats.layers[{i}]", {"inputs": ls.inputs,
                                                    "output_grads": ls.output_grads})

    def _check_requirements(self, stats, oracle, curvature: bool) -> None:
        req = self.core.requirements
        name = f"{self.core.name}(structure={self.core.hyperparams['structure']!r})"
        if curvature or self.core.per_step_batch:
            if req.per_example_grads and (stats is None or stats.per_example_grads is None):
                raise ValueError(f"{name} needs stats=grng_core.Stats(per_example_grads=...) "
                                 f"on step {self.t + 1} (a curvature step)")
            if req.layer_stats and (stats is None or not stats.layers):
                raise ValueError(f"{name} needs stats=grng_core.Stats(layers=[LayerStats(...)]) "
                                 f"on step {self.t + 1} (a curvature step)")
        if req.grad_fn and (oracle is None or oracle.grad_fn is None):
            raise ValueError(f"{name} with gr='finite_difference' needs grad_fn=f(params) -> "
                             "grads (the batch gradient at other parameters) on every step")
        if req.hvp_fn and (oracle is None or oracle.hvp_fn is None):
            raise ValueError(f"{name} with gr='double_backprop' needs hvp_fn=f(params, v) -> "
                             "H v on every step")

    def _device(self):
        ref = flatten(self.params)[0][0]
        if _library(ref) == "cupy":
            import cupy

            return cupy.cuda.Device(ref.device.id)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the step
    @property
    def hyperparams(self) -> dict:
        return self.core.hyperparams

    @property
    def requirements(self) -> gc.Requirements:
        return self.core.requirements

    def refresh_flags(self, t: int | None = None) -> tuple[bool, bool]:
        """(curvature, inverse) of step t (default: the next step). Statistics are needed
        only where curvature is True (every step for 'woodbury')."""
        return self.core.refresh_flags(self.t + 1 if t is None else t)

    def needs_stats(self) -> bool:
        """True when the next step needs `stats` (per-example grads or layer statistics)."""
        req = self.core.requirements
        return bool((req.per_example_grads or req.layer_stats) and self.refresh_flags()[0])

    def step(self, grads, stats: gc.Stats | None = None,
             grad_fn: Callable[[Any], Any] | None = None,
             hvp_fn: Callable[[Any, Any], Any] | None = None,
             oracle: gc.Oracle | None = None, *, collective: gc.Collective | None = None):
        """One optimizer step; the parameters are updated in place.

        grads: same container as params, the batch-mean gradient (params' library and device).
        stats: `grng_core.Stats` for the curvature structure (needed on curvature steps only,
            see `needs_stats()`); grad_fn(params) -> grads and hvp_fn(params, v) -> H v on the
            same batch, for the GR estimator (RENG / R-Kalman), called with *other* params
            containers (pure functions of their argument). `oracle` may be given instead.
        Returns the updates that were added (a container like params).
        """
        self._check_inputs(grads, stats)
        if oracle is None and (grad_fn is not None or hvp_fn is not None):
            oracle = gc.Oracle(grad_fn=grad_fn, hvp_fn=hvp_fn)
        t = self.t + 1
        curvature, inverse = self.core.refresh_flags(t)
        self._check_requirements(stats, oracle, curvature)
        with self._device():
            updates, state = self.core.update(grads, self.state, self.params, stats, oracle,
                                              collective=collective, curvature=curvature,
                                              inverse=inverse)
            new = gc.apply_updates(self.params, updates)  # θ + u in each parameter's dtype
            for p, q in zip(flatten(self.params)[0], flatten(new)[0]):
                p[...] = q  # in place: the training stack's references stay valid
        self.state = state
        self.t = t
        return updates

    # ------------------------------------------------------------------ checkpoints
    def save(self, path) -> None:
        """Write the optimizer state to `path` (portable .npz, atomic; grng_core.save_state)."""
        checkpoint.save_state(path, self.state, self.core, extra={"adapter": "grng_cupy",
                                                                  "host_step": self.t})

    def load(self, path) -> None:
        """Replace the state by the one in `path` (saved by any backend), on the params'
        device. On any error (ValueError: corrupted or mismatched file) nothing changes."""
        with self._device():
            state = checkpoint.load_state(path, like=self.state, opt=self.core)
        step = int(np.asarray(_host(state["step"])))
        skipped = int(np.asarray(_host(state["skipped"])))
        self.state = state
        self.t = step + skipped  # every call of update adds one to exactly one of them

    def state_dict(self) -> dict:
        """The state as NumPy arrays plus metadata (a dict of name -> array, see
        grng_core.checkpoint.state_to_numpy), e.g. to store inside another checkpoint."""
        return checkpoint.state_to_numpy(self.state, self.core,
                                         extra={"adapter": "grng_cupy", "host_step": self.t})

    def load_state_dict(self, arrays: dict) -> None:
        """Inverse of `state_dict` (validated like `load`)."""
        with self._device():
            state = checkpoint.state_from_numpy(arrays, like=self.state, opt=self.core,
                                                source="state_dict")
        self.t = int(np.asarray(_host(state["step"]))) + int(np.asarray(_host(state["skipped"])))
        self.state = state

    def __repr__(self) -> str:
        h = self.core.hyperparams
        return (f"grng_cupy.{self.core.name}(structure={h['structure']!r}, lr={h['lr']!r}, "
                f"library={self.library!r}, t={self.t})")


def _host(x):
    return x.get() if array_api_compat.is_cupy_array(x) else x


def RENG(params, lr=0.1, rho=0.05, damping=1e-3, *, layers=None, **kwargs) -> Optimizer:
    """RENG (ALGORITHMS.md §3.1) over CuPy/NumPy params; keywords as `grng_core.reng`.

    layers: the K-FAC layout (list of grng_core.LayerSpec), needed by structure='kfac'
    (the default); use structure='woodbury' or 'diagonal' for a stack without layer statistics.
    """
    return Optimizer(params, gc.reng(lr, rho, damping, **kwargs), layers)


def RING(params, lr=0.1, rho=0.05, damping=1e-3, *, layers=None, **kwargs) -> Optimizer:
    """RING (ALGORITHMS.md §3.2) over CuPy/NumPy params; keywords as `grng_core.ring`."""
    return Optimizer(params, gc.ring(lr, rho, damping, **kwargs), layers)


def RKalman(params, lr=1.0, rho=0.05, *, layers=None, **kwargs) -> Optimizer:
    """R-Kalman (ALGORITHMS.md §3.3) over CuPy/NumPy params; keywords as `grng_core.rkalman`."""
    return Optimizer(params, gc.rkalman(lr, rho, **kwargs), layers)
