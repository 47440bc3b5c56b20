"""The CuPy (and NumPy) optimizer object: host bookkeeping around `grng_core`, no math here.

The user's training stack holds its parameters as a list (or tuple, or dict) of CuPy arrays
(NumPy arrays for a CPU stack) and computes its own gradients; `step` hands them to the core's
pure `update` and writes θ + u back into the user's arrays in place.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import grng_core as gc
from grng_core import checkpoint
from grng_core.algorithms import BUILDERS
from grng_core.config import CONFIGS, TITLES
from grng_core.describe import StructureReport, describe_state
from grng_core.incidents import Incidents
from grng_core.schedule import skipping_warmup
from grng_core.state import host_step
from grng_core.structures.input_gram import input_arrays
from grng_core.tree import flatten, leaves_like, library
from grng_core.user_frame import user_stacklevel

FALLBACKS = (None, "diagonal", "woodbury")


def _library(x) -> str | None:
    """'numpy' or 'cupy' (grng_core's library test), None for any other array."""
    lib = library(x)
    return lib if lib in ("numpy", "cupy") else None


def _what_array(x) -> str:
    lib = _library(x)
    if lib == "cupy":
        return f"a CuPy array on GPU {x.device.id}"
    if lib == "numpy":
        return "a NumPy array (host memory)"
    return f"a {library(x)}.{type(x).__name__}"


def _where(name: str, key) -> str:
    return f"{name}[{key!r}]"


class CupyOptimizer:
    """RENG / RING / R-Kalman for parameters held as CuPy (or NumPy) arrays.

    Build it with `grng_cupy.RENG(params, ...)`, `RING(...)` or `RKalman(...)`. `params` is a
    list, tuple or dict of arrays of one library (CuPy on one GPU, or NumPy); they are updated
    in place by `step`, so references the training stack keeps stay valid.

    Attributes: `params` (the user's container), `core` (the `grng_core.Optimizer` that runs:
    with `fallback`, a kfac optimizer given no layers is resolved by the core to the fallback
    structure), `config` (its hyperparameters), `state` (the core's `OptState`, arrays on the
    params' device), `t` (host step counter: calls of `step`, = `grng_core.state.host_step`).
    """

    def __init__(self, params, core: gc.Optimizer, layers: Sequence[gc.LayerSpec] | None = None,
                 fallback: str | None = None):
        leaves, container = flatten(params)
        if not leaves:
            raise ValueError("params hold no arrays")
        self._check_params(leaves, container.keys)
        if fallback not in FALLBACKS:
            raise ValueError(f"invalid fallback={fallback!r}: allowed None (structure 'kfac' "
                             "needs layers), 'diagonal' or 'woodbury'")
        if core.config.structure == "kfac" and layers is None and fallback is None:
            raise ValueError(
                f"grng_cupy.{TITLES[core.name]} with structure 'kfac' needs the layer layout: "
                "layers=[gc.LayerSpec(weight=key, bias=key_or_None, transposed=...), ...] "
                "(transposed=False: W is (d_out, d_in); True: (d_in, d_out)), or "
                "fallback='diagonal' / 'woodbury' for a model without layers, or "
                "structure='diagonal'")
        core.check_sizes(params, layers)
        if fallback is not None:
            core = core.resolve(layers, fallback)
        self.params = params
        self.core = core
        self.layers = None if layers is None or core.config.structure != "kfac" else list(layers)
        self._container = container
        with self._device():
            self.state = core.init(params, layers=self.layers)
        self.t = 0
        self.incidents = Incidents()  # factors that needed extra damping (host side)
        self._no_warmup: set[int] = set()  # K-FAC layers seen to skip the warm-up

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_params(leaves, keys) -> None:
        first = leaves[0]
        lib = _library(first)
        if lib is None:
            raise TypeError(
                f"grng_cupy takes CuPy arrays (or NumPy arrays for a CPU stack); "
                f"{_where('params', keys[0])} is {_what_array(first)}. Use grng_torch for torch "
                "tensors and grng_jax for JAX arrays")
        for k, x in zip(keys, leaves):
            if _library(x) != lib or (lib == "cupy" and x.device.id != first.device.id):
                raise TypeError(
                    f"all parameters must be arrays of one library on one device: "
                    f"{_where('params', keys[0])} is {_what_array(first)}, "
                    f"{_where('params', k)} is {_what_array(x)}")
            if lib == "numpy" and not x.flags.writeable:
                raise ValueError(f"{_where('params', k)} is a read-only NumPy array: the "
                                 "optimizer updates parameters in place")

    @property
    def library(self) -> str:
        """'cupy' or 'numpy': the library of the parameters (and of the state)."""
        return library(flatten(self.params)[0][0])

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
                    f"device mismatch: the parameters are {_what_array(ref)} but {what}[{k!r}] is "
                    f"{_what_array(x)}; {fix}")

    def _check_inputs(self, grads, stats: gc.Stats | None) -> None:
        g_leaves = leaves_like(grads, self._container, "grads")
        g_container = self._container
        self._same_place("grads", dict(zip(g_container.keys, g_leaves)))
        if stats is None:
            return
        if stats.per_example_grads is not None:
            pe, _ = flatten(stats.per_example_grads, "stats.per_example_grads")
            self._same_place("stats.per_example_grads", dict(zip(self._container.keys, pe)))
        for i, ls in enumerate(stats.layers or ()):
            arrays = input_arrays(ls.inputs)  # the rows, or an InputGram's three (§2.1)
            names = ("inputs",) if len(arrays) == 1 else ("gram", "total", "probed")
            self._same_place(f"stats.layers[{i}]", {**dict(zip(names, arrays)),
                                                    "output_grads": ls.output_grads})

    def _check_requirements(self, stats, oracle, curvature: bool) -> None:
        req = self.core.requirements
        name = f"{self.core.name}(structure={self.core.config.structure!r})"
        if curvature:  # always True for 'woodbury' (the core's flags)
            if req.per_example_grads and (stats is None or stats.per_example_grads is None):
                raise ValueError(f"{name} needs stats=grng_core.Stats(per_example_grads=...) "
                                 f"on step {self.t + 1} (a curvature step)")
            if req.layer_stats and (stats is None or not stats.layers):
                raise ValueError(f"{name} needs stats=grng_core.Stats(layers=[LayerStats(...)]) "
                                 f"on step {self.t + 1} (a curvature step)")
        if req.grad_fn and (oracle is None or (oracle.grad_fn is None
                                               and oracle.grad_rows_fn is None)):
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
    def config(self):
        """The hyperparameters (a `grng_core.config` record)."""
        return self.core.config

    @property
    def requirements(self) -> gc.Requirements:
        return self.core.requirements

    def flags(self, step: int | None = None) -> tuple[bool, bool]:
        """(curvature, inverse) at `step` steps already taken (default `t`: the next call of
        `step`); the core's `flags`. Statistics are needed only where curvature is True (every
        step for 'woodbury'); K-FAC rows given on the other steps serve the factored form
        (`requirements.layer_rows`, ALGORITHMS.md §2.1; NumPy arrays only: on a GPU choosing
        it would need a device-to-host read, so CuPy preconditions densely). A
        finite-difference ĝ takes it too when the oracle gives its passes' rows
        (`oracle=gc.Oracle(grad_rows_fn=...)`, `requirements.fd_rows`) and every step's rows
        are given."""
        return self.core.flags(self.t if step is None else step)

    def needs_stats(self) -> bool:
        """True when the next step needs `stats` (per-example grads or layer statistics)."""
        req = self.core.requirements
        return bool((req.per_example_grads or req.layer_stats) and self.flags()[0])

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
        curvature, inverse = self.flags()
        self._check_requirements(stats, oracle, curvature)
        steady = self.core.steady_flags(self.t)
        if self.t == 0 and collective is None and stats is not None and stats.layers:
            self._warn_if_unexplained(grads, stats)
        with self._device():
            updates, state = self.core.update(grads, self.state, self.params, stats, oracle,
                                              collective=collective, curvature=curvature,
                                              inverse=inverse, steady=steady,
                                              incidents=self.incidents)
            new = gc.apply_updates(self.params, updates)  # θ + u in each parameter's dtype
            for p, q in zip(flatten(self.params)[0], flatten(new)[0]):
                p[...] = q  # in place: the training stack's references stay valid
        if steady is not None and stats is not None and stats.layers:
            self._no_warmup |= skipping_warmup(self.core.config, self.state, stats.layers,
                                               self._container, 1 if collective is None
                                               else int(collective.replicas))
        self.state = state
        self.t += 1
        return updates

    def _warn_if_unexplained(self, grads, stats: gc.Stats) -> None:
        """Warn at the first step for the K-FAC layers whose gradient their statistics' rows
        do not explain (`grng_core.Optimizer.unexplained`, ALGORITHMS.md §2.1): in a
        hand-written stack, most often a layer given in the other orientation (a square
        bias-free one passes every shape check)."""
        with self._device():
            bad = self.core.unexplained(grads, self.state, self.params, stats)
        if bad:
            warnings.warn(
                f"{self.core.name}: the first step's gradient of K-FAC layer(s) "
                f"{', '.join(repr(k) for k in bad)} is not the product of the layer's "
                "statistics, c·sᵀa/B + α·W + β·b (ALGORITHMS.md §2.1): check the LayerSpec's "
                "orientation (transposed=False: W is (d_out, d_in), used as x @ W.T; "
                "transposed=True: (d_in, d_out), used as x @ W), that the inputs and output "
                "gradients are those of the layer's own calls (output gradients of the "
                "batch-mean loss times B), and that the weight is used nowhere else "
                "(checked at the first step only)", UserWarning, stacklevel=user_stacklevel())

    def describe(self) -> StructureReport:
        """Which structure each parameter (by its key) is preconditioned with, the K-FAC layers,
        the share of weight-matrix elements under K-FAC, skipped steps and factors that needed
        extra damping (`grng_core.describe`); `print(opt.describe())` shows the table."""
        leaves, container = flatten(self.params)
        names = [str(k) for k in container.keys]
        return describe_state(self.core.name, self.core.config.structure, self.state,
                              [tuple(x.shape) for x in leaves], config=self.core.config,
                              names=names,
                              incidents=self.incidents.entries(),
                              no_warmup=[names[w] for w in sorted(self._no_warmup)])

    # ------------------------------------------------------------------ checkpoints
    def _leaf_names(self) -> list[str] | None:
        """A dict's keys in leaf order (checkpoints keep the state per position); None for a
        list or tuple."""
        c = self._container
        return [str(k) for k in c.keys] if c.kind is dict else None

    def _extra(self) -> dict:
        return {"adapter": "grng_cupy", "host_step": self.t}

    def save(self, path) -> None:
        """Write the optimizer state to `path` (portable .npz, atomic; grng_core.save_state),
        with the optimizer's name and hyperparameters, which `load` checks."""
        checkpoint.save_state(path, self.state, self.core, extra=self._extra(),
                              leaf_names=self._leaf_names())

    def load(self, path, *, allow_changed=()) -> None:
        """Replace the state by the one in `path` (saved by any backend), on the params'
        device. The file's optimizer name and hyperparameters must be this optimizer's, but
        those named in `allow_changed` (("lr",): resume with this optimizer's learning rate).
        On any error (ValueError: corrupted or mismatched file) nothing changes."""
        with self._device():
            state = checkpoint.load_state(path, like=self.state, opt=self.core,
                                          leaf_names=self._leaf_names(),
                                          allow_changed=allow_changed)
        self._set_state(state)

    def state_dict(self) -> dict:
        """The state as NumPy arrays plus metadata (a dict of name -> array, see
        grng_core.checkpoint.state_to_numpy), e.g. to store inside another checkpoint."""
        return checkpoint.state_to_numpy(self.state, self.core, extra=self._extra(),
                                         leaf_names=self._leaf_names())

    def load_state_dict(self, arrays: dict) -> None:
        """Inverse of `state_dict` (validated like `load`, hyperparameters included)."""
        with self._device():
            state = checkpoint.state_from_numpy(arrays, like=self.state, opt=self.core,
                                                source="state_dict",
                                                leaf_names=self._leaf_names())
        self._set_state(state)

    def _set_state(self, state: gc.OptState) -> None:
        t = host_step(state)  # every call of update adds one to exactly one of its counters
        self.state, self.t = state, t

    def __repr__(self) -> str:
        h = self.core.config
        return (f"grng_cupy.{TITLES[self.core.name]}(structure={h.structure!r}, lr={h.lr!r}, "
                f"library={self.library!r}, t={self.t})")


# ---------------------------------------------------------------------- builders
_SUMMARIES = {
    "reng": "RENG (ALGORITHMS.md §3.1): d = (F + λI)⁻¹ ĝ",
    "ring": "RING (ALGORITHMS.md §3.2): d = (1 − ρλ)(F + λI)⁻¹ g + ρ g",
    "rkalman": "R-Kalman (ALGORITHMS.md §3.3): a Kalman filter over the parameters",
}
_OPTIONS_DOC = """
    Adapter options:
      layers: the K-FAC layout (a list of grng_core.LayerSpec), needed by structure 'kfac'
        (use 'woodbury' or 'diagonal' for a stack without layer statistics).
      fallback: None (default: structure 'kfac' without layers is an error), or 'diagonal' /
        'woodbury': the structure that runs instead when no layer is given
        (grng_core.Optimizer.resolve).
"""


def _signature(name: str) -> inspect.Signature:
    """params, then the config record's fields with its defaults, then the adapter options."""
    P = inspect.Parameter
    fields = [p.replace(annotation=P.empty)
              for p in inspect.signature(CONFIGS[name]).parameters.values()]
    options = [P("layers", P.KEYWORD_ONLY, default=None),
               P("fallback", P.KEYWORD_ONLY, default=None)]
    return inspect.Signature([P("params", P.POSITIONAL_OR_KEYWORD), *fields, *options],
                             return_annotation=CupyOptimizer)


def _builder(name: str):
    """`grng_cupy.RENG` / `RING` / `RKalman`: signature and docstring from the config record."""
    sig = _signature(name)

    def build(*args, **kwargs) -> CupyOptimizer:
        arguments = dict(sig.bind(*args, **kwargs).arguments)  # omitted: the core's default
        params = arguments.pop("params")
        layers, fallback = arguments.pop("layers", None), arguments.pop("fallback", None)
        return CupyOptimizer(params, BUILDERS[name](**arguments), layers, fallback)

    cls = CONFIGS[name]
    build.__name__ = build.__qualname__ = TITLES[name]
    build.__module__ = "grng_cupy"
    build.__signature__ = sig  # type: ignore[attr-defined]
    build.__doc__ = (f"{_SUMMARIES[name]}, over CuPy/NumPy params (updated in place).\n\n"
                     f"    Hyperparameters (grng_core.config.{cls.__name__}):\n"
                     f"{cls.doc_table(indent='      ')}\n{_OPTIONS_DOC}")
    return build


RENG = _builder("reng")
RING = _builder("ring")
RKalman = _builder("rkalman")
