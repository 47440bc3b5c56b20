"""Hyperparameters: one typed, frozen, self-validating record per algorithm (ALGORITHMS.md §1–§4).

`RENGConfig`, `RINGConfig` and `RKalmanConfig` are the single source of every hyperparameter:
its name, default, allowed values and one-line doc live in one field. The core's builders
(`grng_core.reng(...)`), the adapters' signatures and docstrings (`grng_torch.RING`,
`grng_jax.ring`, `grng_cupy.RING`) and the checkpoints' hyperparameter check all read them, so a
new hyperparameter is one field here plus its documentation.

Constructing a record validates it: a ValueError names the parameter, its value and the
allowed range. Schedules (callables of the 1-based step t) are allowed where `schedulable`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

from grng_core.user_frame import user_stacklevel

STRUCTURES = ("kfac", "diagonal", "woodbury")
ESTIMATORS = ("double_backprop", "finite_difference")
FD_SCHEMES = ("forward", "backward", "central")
FISHERS = ("empirical", "mc")
INVERSE_METHODS = ("newton_schulz", "cholesky", "eigh", "auto")
ON_NONFINITE = ("skip", "raise")
RING_FORMS = ("adaptive_damping", "gauss_newton")
STATE_DTYPES = (None, "float32", "float64")

Schedule = Callable[[Any], Any]
Scalar = float | Schedule


# ------------------------------------------------------------------ checks
def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"invalid {name}={value!r}: allowed {allowed}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _bad(name, value, "a finite real number")
    return float(value)


def check_range(name, value, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite number in [low, high] (open ends where asked); returns it as float."""
    v = _number(name, value)
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not (lo_ok and hi_ok):
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lb = "-inf" if low is None else f"{low}"
        hb = "inf" if high is None else f"{high}"
        raise _bad(name, value, f"a number in {left}{lb}, {hb}{right}")
    return v


def check_scheduled(name, value, low=None, low_open=False):
    """A number in range, or a callable of the step count (a schedule), checked at t = 1."""
    if callable(value):
        try:
            first = float(value(1))
        except Exception:  # a schedule that only takes arrays: checked when it runs
            return value
        check_range(f"{name}(t=1)", first, low=low, low_open=low_open)
        return value
    return check_range(name, value, low=low, low_open=low_open)


def check_choice(name, value, choices):
    if value not in choices:
        raise _bad(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_int(name, value, low=1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise _bad(name, value, f"an integer >= {low}")
    return int(value)


def value_at(h, t):
    """The hyperparameter at step t (a schedule is called with the step-count array)."""
    return h(t) if callable(h) else h


def is_static_zero(h) -> bool:
    """True when h is the constant 0 (not a schedule): its term can be skipped statically."""
    return not callable(h) and h == 0.0


# ------------------------------------------------------------------ field spec
def hp(default, doc: str, check: Callable[[str, Any], Any], *, schedulable: bool = False):
    """A hyperparameter field: its default, one-line doc and validator (name, value) -> value."""
    return field(default=default, metadata={"doc": doc, "check": check,
                                            "schedulable": schedulable})


def _positive(name, v):
    return check_scheduled(name, v, low=0.0, low_open=True)


def _nonneg_sched(name, v):
    return check_scheduled(name, v, low=0.0)


def _unit(name, v):
    return check_range(name, v, 0.0, 1.0, high_open=True)


def _choice(choices):
    return lambda name, v: check_choice(name, v, choices)


def _optional(check):
    return lambda name, v: None if v is None else check(name, v)


_LR_DOC = "learning rate η (number or schedule of t)"
_RHO_DOC = "gradient-regularisation strength ρ (§1; number or schedule)"
_DAMPING_DOC = "damping λ of F + λI (§2; number or schedule)"


#: The decay per step η·ω above which a config warns (once per process): 0.1% of every weight
#: a step, 10x AdamW's usual 1e-4 (lr 1e-3, weight_decay 0.1).
DECAY_WARN = 1e-3
_decay_warned: list[bool] = []


def _warn_if_decay_dominates(config) -> None:
    """§3 tail applies θ ← θ − ηωθ outside the trust region: at GRNG's lr (0.1; R-Kalman 1.0)
    an AdamW-sized weight_decay shrinks every weight by 1–10% a step, whatever the step."""
    lr, wd = config.lr, config.weight_decay
    if _decay_warned or callable(lr) or wd == 0.0 or lr * wd <= DECAY_WARN:
        return
    _decay_warned.append(True)
    warnings.warn(
        f"{config.algorithm}: weight_decay={wd:g} at lr={lr:g} shrinks every weight by "
        f"{lr * wd:.1%} a step (decoupled decay θ ← θ − lr·weight_decay·θ, ALGORITHMS.md §3, "
        "not limited by the kl_clip trust region). AdamW's usual 0.1 at lr 1e-3 is 1e-4 a step: "
        f"for that, weight_decay={1e-4 / lr:g} (README \"Defaults\", weight decay). Warned once.",
        UserWarning, stacklevel=user_stacklevel())


@dataclass(frozen=True)
class _Common:
    """Fields every algorithm has (the curvature, the tail, numerics)."""

    _: KW_ONLY
    structure: str = hp("kfac", "curvature structure: 'kfac', 'diagonal' or 'woodbury' (§2)",
                        _choice(STRUCTURES))
    fisher: str = hp("empirical", "labels of the curvature statistics: 'empirical' or 'mc'",
                     _choice(FISHERS))
    momentum: float = hp(0.0, "heavy-ball momentum μ in [0, 1) (§3 tail)", _unit)
    weight_decay: float = hp(0.0, "decoupled weight decay ω >= 0 (§3 tail)",
                             lambda n, v: check_range(n, v, 0.0))
    ema_decay: float = hp(0.95, "β of the curvature EMAs in [0, 1) (§2.1, §2.2)", _unit)
    curvature_every: int = hp(10, "statistics every this many steps (README \"Defaults\")",
                              check_int)
    inverse_every: int = hp(10, "K-FAC inverses (RING adaptive_damping: eigendecompositions) "
                            "every this many steps", check_int)
    refresh_warmup: int | None = hp(
        None, "the first steps refresh statistics and inverses on every step; None: "
        "⌈1/(1 − ema_decay)⌉ (the EMA's horizon: 20 at 0.95), 0: no warm-up (§2.1)",
        _optional(lambda n, v: check_int(n, v, low=0)))
    warmup_rows: float | None = hp(
        10.0, "a K-FAC layer given at least this many rows per step per dimension of its larger "
        "factor (n >= warmup_rows·max(d_A, d_S)) skips the warm-up; None: every layer warms up "
        "(§2.1)", _optional(lambda n, v: check_range(n, v, 0.0, low_open=True)))
    max_factor_dim: int | None = hp(
        8192, "a layer with a K-FAC factor larger than this (A: d_in + bias unless diagonal; S: "
        "d_out) uses the diagonal structure, as its d² memory and d³ inverses would dwarf the "
        "rest of the step (an untied LM head's vocabulary); None: no limit (§2.1)",
        _optional(check_int))
    ns_tol: float | None = hp(None, "Newton–Schulz tolerance (None: 1e-6 float64, 1e-4 float32)",
                              _optional(lambda n, v: check_range(n, v, 0.0, 1.0, low_open=True,
                                                                 high_open=True)))
    ns_max_iter: int = hp(50, "Newton–Schulz iteration budget", check_int)
    inverse_method: str = hp("auto", "'auto' (Cholesky where the namespace has linalg, else "
                             "Newton–Schulz), 'newton_schulz', 'cholesky' or 'eigh' (§2.1)",
                             _choice(INVERSE_METHODS))
    kl_clip: Scalar | None = hp(1e-3, "KL trust region κ > 0 (§3 tail; number or schedule "
                                "of t); None or inf: off",
                                _optional(lambda n, v: None if v == math.inf else
                                          check_scheduled(n, v, 0.0, low_open=True)),
                                schedulable=True)
    state_dtype: str | None = hp(None, "dtype of the state: None (float64 if any parameter is, "
                                 "else float32), 'float32' or 'float64'", _choice(STATE_DTYPES))
    on_nonfinite: str = hp("skip", "a non-finite step: 'skip' (warn, count) or 'raise'",
                           _choice(ON_NONFINITE))

    algorithm: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = f.metadata["check"](f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._check_joint()
        _warn_if_decay_dominates(self)

    def _check_joint(self) -> None:
        """Checks that involve several fields (overridden per algorithm)."""

    # ---- views
    def replace(self, **changes):
        """A validated copy with `changes` (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """{name: value} in field order (schedules stay callables)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}

    @classmethod
    def schedulable(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["schedulable"])

    @classmethod
    def signature(cls) -> inspect.Signature:
        """The constructor's signature: lr, rho[, damping] positional, the rest keyword-only
        (the builders' and adapters' signatures derive from it)."""
        return inspect.signature(cls)

    @classmethod
    def doc_table(cls, indent: str = "    ") -> str:
        """One line per hyperparameter, in signature order: name (default): doc."""
        docs = cls.docs()
        return "\n".join(f"{indent}{p.name} ({p.default!r}): {docs[p.name]}"
                         for p in cls.signature().parameters.values())


@dataclass(frozen=True)
class RENGConfig(_Common):
    """RENG (§3.1): d = (F + λI)⁻¹ ĝ."""

    lr: Scalar = hp(0.1, _LR_DOC, _nonneg_sched, schedulable=True)
    rho: Scalar = hp(0.05, _RHO_DOC, _nonneg_sched, schedulable=True)
    damping: Scalar = hp(1e-3, _DAMPING_DOC, _positive, schedulable=True)
    _: KW_ONLY
    gr: str = hp("double_backprop", "ĝ estimator: 'double_backprop' or 'finite_difference' (§1)",
                 _choice(ESTIMATORS))
    fd_scheme: str = hp("forward", "finite-difference scheme: 'forward', 'backward', 'central'",
                        _choice(FD_SCHEMES))
    fd_radius: float = hp(1e-3, "finite-difference radius r > 0 (ε = r/‖g‖, §1)",
                          lambda n, v: check_range(n, v, 0.0, low_open=True))

    algorithm: ClassVar[str] = "reng"


@dataclass(frozen=True)
class RINGConfig(_Common):
    """RING (§3.2): form "adaptive_damping" d = (F + (λ + ρ‖g‖²) I)⁻¹ g (default), form
    "gauss_newton" d = (1 − ρλ)(F + λI)⁻¹ g + ρ g (requires 0 ≤ ρλ ≤ 1)."""

    lr: Scalar = hp(0.1, _LR_DOC, _nonneg_sched, schedulable=True)
    rho: Scalar = hp(0.05, _RHO_DOC, _nonneg_sched, schedulable=True)
    damping: Scalar = hp(1e-3, _DAMPING_DOC, _positive, schedulable=True)
    _: KW_ONLY
    form: str = hp("adaptive_damping", "'adaptive_damping' (d = (F + (λ + ρ‖g‖²)I)⁻¹ g) or "
                   "'gauss_newton' (d = (1 − ρλ)(F + λI)⁻¹ g + ρ g) (§3.2)", _choice(RING_FORMS))

    algorithm: ClassVar[str] = "ring"

    def _check_joint(self) -> None:
        rho, damping = self.rho, self.damping
        if self.form != "gauss_newton":
            return
        if not callable(rho) and not callable(damping) and rho * damping > 1.0:
            raise ValueError(f"invalid rho*damping={rho * damping!r} (rho={rho!r}, "
                             f"damping={damping!r}): RING form='gauss_newton' allowed range is "
                             "0 <= rho*damping <= 1 (form='adaptive_damping' has no bound)")


@dataclass(frozen=True)
class RKalmanConfig(_Common):
    """R-Kalman (§3.3): a Kalman filter over the parameters; the mean moves along P⁺ ĝ."""

    lr: Scalar = hp(1.0, _LR_DOC, _nonneg_sched, schedulable=True)
    rho: Scalar = hp(0.05, _RHO_DOC, _nonneg_sched, schedulable=True)
    _: KW_ONLY
    structure: str = hp("kfac", "belief: 'kfac' (Kronecker, the default), 'woodbury' or "
                        "'diagonal' (§3.3)", _choice(STRUCTURES))
    gr: str = hp("finite_difference", "ĝ estimator: 'double_backprop' or 'finite_difference'",
                 _choice(ESTIMATORS))
    fd_scheme: str = hp("forward", "finite-difference scheme: 'forward', 'backward', 'central'",
                        _choice(FD_SCHEMES))
    fd_radius: float = hp(1e-3, "finite-difference radius r > 0 (ε = r/‖g‖, §1)",
                          lambda n, v: check_range(n, v, 0.0, low_open=True))
    kalman_decay: float = hp(0.95, "fading memory β_K in [0, 1) (§3.3)", _unit)
    prior_var: float = hp(1.0, "prior variance σ₀² > 0 (§3.3)",
                          lambda n, v: check_range(n, v, 0.0, low_open=True))
    damping: Scalar = hp(1e-2, "damping λ of the kfac belief (§3.3)", _positive,
                         schedulable=True)
    inverse_every: int = hp(10, "unused by R-Kalman (its kfac belief inverts no factor; see "
                            "kalman_refresh_every)", check_int)
    kalman_predict_steps: int = hp(1, "Newton–Schulz steps of the kfac belief's predict "
                                   "(§3.3)", check_int)
    kalman_refresh_every: int | None = hp(None, "direct refresh of the kfac belief every this "
                                          "many steps, or None: never (§3.3)",
                                          _optional(check_int))

    algorithm: ClassVar[str] = "rkalman"

    def _check_joint(self) -> None:
        if self.structure == "kfac" and not self.ema_decay > 0.5:
            raise ValueError(f"invalid ema_decay={self.ema_decay!r}: rkalman with structure "
                             "'kfac' needs ema_decay in (0.5, 1) for its one-step Newton–Schulz "
                             "predict")


Config = RENGConfig | RINGConfig | RKalmanConfig
CONFIGS: dict[str, type[Config]] = {c.algorithm: c for c in (RENGConfig, RINGConfig,
                                                             RKalmanConfig)}
TITLES = {"reng": "RENG", "ring": "RING", "rkalman": "RKalman"}


def upgrade_saved(algorithm: str, saved: dict) -> dict:
    """Hyperparameters recorded by an earlier version, with what their absent keys meant
    then: no refresh warm-up (once it existed: for every layer); RING had only form
    "gauss_newton"; R-Kalman's kfac belief was refreshed directly every `inverse_every` steps
    with one predict step."""
    out = dict(saved)
    if algorithm == "ring":
        out.setdefault("form", "gauss_newton")
    out.setdefault("refresh_warmup", 0)  # no warm-up before it existed
    out.setdefault("warmup_rows", None)  # every layer took the warm-up
    out.setdefault("max_factor_dim", None)  # no limit before it existed
    if algorithm == "rkalman":
        if "kalman_refresh_every" not in out:
            out["kalman_refresh_every"] = out.get("inverse_every")
        out.setdefault("kalman_predict_steps", 1)
    return out


# hyperparameters an algorithm has (common fields) but does not use: they cannot make two
# checkpoints of it differ
UNUSED = {"rkalman": ("inverse_every",)}


def unused(algorithm: str, hyper: dict) -> tuple[str, ...]:
    """The hyperparameters that cannot change these (JSON) hyperparameters' steps: UNUSED,
    `warmup_rows` without a warm-up or K-FAC, and `max_factor_dim` (applied where the layers
    are chosen, when a state is built: the state's K-FAC layers record what it chose)."""
    moot = hyper.get("refresh_warmup") == 0 or hyper.get("structure", "kfac") != "kfac"
    return UNUSED.get(algorithm, ()) + (("warmup_rows",) if moot else ()) + ("max_factor_dim",)


def per_step_damping(config: Config) -> bool:
    """True when the damping of the curvature changes every step: RING's adaptive_damping
    form, c_t = λ + ρ‖g_t‖² (§3.2), with ρ not the constant 0 (ρ = 0 is NGD with λ)."""
    return getattr(config, "form", None) == "adaptive_damping" and not is_static_zero(config.rho)


def uses_estimator(config: Config) -> bool:
    """True when ĝ comes from an oracle (RENG, R-Kalman with ρ not the constant 0)."""
    return hasattr(config, "gr") and not is_static_zero(config.rho)
