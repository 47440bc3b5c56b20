"""The one table of optimizer configurations of the test suites (core and every adapter).

`TABLE` is `grng_core.consistency.cases.default_configs()`, one `Case` per row: optimizer x
structure x estimator, RING x form (6 RING + 6 RENG + 6 R-Kalman), each with the consistency suite's
hyperparameters. A suite picks its rows with `select(...)` (or `get(label)`), widens them with
`variants(...)` (finite-difference scheme, Fisher), and sets its own hyperparameters as data
with `case.using(**hp)` (or `case.bare`: the builders' defaults, but for the refresh and
trust-region settings below). The suites check the math of
§2–§3 against references that have no trust region and refresh on every step, so every case
turns the default KL clip off (`kl_clip=None`) and refreshes statistics and inverses on every
step with no warm-up (`curvature_every=1, inverse_every=1, refresh_warmup=0`) unless it sets
its own; the defaults themselves are tested on the model zoo
(tests/torch/test_zoo.py, tests/jax/test_zoo_flax.py). One case builds every library's
optimizer:

    case.build(**overrides)                    # grng_core.reng / ring / rkalman
    case.torch(params, **overrides)            # grng_torch.RENG / RING / RKalman
    case.jax(learning_rate, **overrides)       # grng_jax.reng / ring / rkalman (optax)
    case.cupy(params, **overrides)             # grng_cupy.RENG / RING / RKalman

Labels are the consistency suite's (`reng/kfac/double_bp`, `ring/woodbury/-`) with the
variants appended: `rkalman/kfac/fin_diff:central` (finite-difference scheme), `+mc` (Fisher).
Ids (`case.id`, for pytest) spell them out: `rkalman-kfac-finite_difference-central-mc`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from grng_core.config import CONFIGS as RECORDS
from grng_core.consistency.cases import QUICK, Config, default_configs

_CONFIGS = default_configs()
# the table's axes, in its order: ring, reng, rkalman; kfac, diagonal, woodbury; ...
OPTIMIZERS = tuple(dict.fromkeys(c.optimizer for c in _CONFIGS))
STRUCTURES = tuple(dict.fromkeys(c.structure for c in _CONFIGS))
ESTIMATORS = tuple(dict.fromkeys(c.estimator for c in _CONFIGS if c.estimator is not None))
FD_SCHEMES = ("forward", "backward", "central")
FISHERS = ("empirical", "mc")
SHORT = {"double_backprop": "double_bp", "finite_difference": "fin_diff", None: "-"}
CLASS_NAMES = {"reng": "RENG", "ring": "RING", "rkalman": "RKalman"}

# the builders' defaults (grng_core.config): structure and estimator of `gc.reng()` etc.
DEFAULT_STRUCTURE = {name: RECORDS[name]().structure for name in OPTIMIZERS}
DEFAULT_ESTIMATOR = {name: getattr(RECORDS[name](), "gr", None) for name in OPTIMIZERS}
DEFAULT_FORM = {name: getattr(RECORDS[name](), "form", None) for name in OPTIMIZERS}

# keywords some optimizer takes and another does not (a RING case drops gr, fd_radius ...,
# a RENG case kalman_decay and prior_var), so that one set of drawn hyperparameters serves
# every row; a keyword no optimizer takes still raises TypeError
_ALL_FIELDS = set().union(*(RECORDS[n].names() for n in OPTIMIZERS))


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: a table row, optionally with a finite-difference scheme
    and a Fisher (None: the builder's default), and hyperparameters as (name, value) pairs."""

    optimizer: str
    structure: str
    estimator: str | None
    fd_scheme: str | None = None
    fisher: str | None = None
    kwargs: tuple = ()
    form: str | None = None  # RING's form (§3.2); None: the builder's default

    @classmethod
    def from_config(cls, config: Config) -> Case:
        return cls(config.optimizer, config.structure, config.estimator,
                   kwargs=tuple(config.kwargs), form=config.form)

    # ------------------------------------------------------------------ names
    @property
    def base_label(self) -> str:
        return self.config.label

    @property
    def label(self) -> str:
        scheme = f":{self.fd_scheme}" if self.fd_scheme else ""
        fisher = f"+{self.fisher}" if self.fisher else ""
        return self.base_label + scheme + fisher

    @property
    def id(self) -> str:
        form = "adaptive" if self.form == "adaptive_damping" else None
        parts = (self.optimizer, self.structure, self.estimator, form, self.fd_scheme,
                 self.fisher)
        return "-".join(p for p in parts if p)

    @property
    def class_name(self) -> str:
        """grng_torch's / grng_cupy's class: RENG, RING, RKalman."""
        return CLASS_NAMES[self.optimizer]

    @property
    def default_estimator(self) -> bool:
        """The builder's estimator (and, for RING, its default form)."""
        return (self.estimator == DEFAULT_ESTIMATOR[self.optimizer]
                and self.form in (None, DEFAULT_FORM.get(self.optimizer)))

    @property
    def config(self) -> Config:
        """The row of grng_core.consistency's table."""
        return Config(self.optimizer, self.structure, self.estimator, self.kwargs, self.form)

    def __str__(self) -> str:
        return self.label

    # ------------------------------------------------------------ derived cases
    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)

    def using(self, **hp) -> Case:
        """This configuration with the hyperparameters `hp` instead of the table's (a suite's
        own, as data); fisher= and fd_scheme= set the variant fields. The structure and the
        estimator are the row's: pick another row for another."""
        if "structure" in hp or "gr" in hp:
            raise ValueError(f"{self.label}: structure and gr are the row's, not hyperparameters")
        fields = {k: hp.pop(k) for k in ("fisher", "fd_scheme") if k in hp}
        return dataclasses.replace(self, kwargs=tuple(hp.items()), **fields)

    @property
    def bare(self) -> Case:
        """No hyperparameters: the builders' defaults."""
        return self.using()

    # ----------------------------------------------------------------- builders
    def options(self, **overrides) -> dict[str, Any]:
        """The keywords of this optimizer's builder: structure, estimator, scheme, Fisher,
        hyperparameters, then `overrides`; keywords of other optimizers dropped."""
        kw: dict[str, Any] = {"structure": self.structure, "kl_clip": None,
                              "curvature_every": 1, "inverse_every": 1, "refresh_warmup": 0}
        if self.estimator is not None:
            kw["gr"] = self.estimator
        if self.fd_scheme is not None:
            kw["fd_scheme"] = self.fd_scheme
        if self.fisher is not None:
            kw["fisher"] = self.fisher
        if self.form is not None:
            kw["form"] = self.form
        kw.update(self.kwargs)
        kw.update(overrides)
        own = set(RECORDS[self.optimizer].names())
        return {k: v for k, v in kw.items() if k in own or k not in _ALL_FIELDS}

    def build(self, **overrides):
        """The core optimizer (grng_core.reng / ring / rkalman)."""
        import grng_core as gc

        return getattr(gc, self.optimizer)(**self.options(**overrides))

    def torch(self, params, **overrides):
        """grng_torch.RENG / RING / RKalman over `params` (model=, loss_fn= ... in overrides)."""
        import grng_torch

        return getattr(grng_torch, self.class_name)(params, **self.options(**overrides))

    def jax(self, learning_rate=None, **overrides):
        """grng_jax.reng / ring / rkalman; the learning rate is the first argument (optax)."""
        import grng_jax

        kw = self.options(**overrides)
        lr = kw.pop("lr", None)
        if kw.get("kl_clip", 0.0) is None:
            kw["kl_clip"] = float("inf")  # grng_jax: None keeps the default; inf is off
        return getattr(grng_jax, self.optimizer)(lr if learning_rate is None else learning_rate,
                                                 **kw)

    def cupy(self, params, **overrides):
        """grng_cupy.RENG / RING / RKalman over `params` (layers= in overrides)."""
        import grng_cupy

        return getattr(grng_cupy, self.class_name)(params, **self.options(**overrides))


TABLE: tuple[Case, ...] = tuple(Case.from_config(c) for c in _CONFIGS)
BY_LABEL = {c.label: c for c in TABLE}


def _match(value, wanted) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, (tuple, list, set, frozenset)):
        return value in wanted
    return value == wanted


_ANY = object()


def select(*, optimizer=None, structure=None, estimator: Any = _ANY, default_estimator=None,
           labels=None, where=None, bare=False, cases: Iterable[Case] = TABLE) -> list[Case]:
    """The rows that match: each filter a value or a collection of values (None: any; for
    `estimator`, None means RING's "no estimator"); `labels` a collection of labels;
    `default_estimator` True keeps each optimizer x structure once (the builder's estimator);
    `where` a predicate; `bare` drops the table's hyperparameters."""
    out = []
    for c in cases:
        if not (_match(c.optimizer, optimizer) and _match(c.structure, structure)):
            continue
        if estimator is not _ANY and not (c.estimator == estimator if estimator is None
                                          else _match(c.estimator, estimator)):
            continue
        if default_estimator is not None and c.default_estimator != default_estimator:
            continue
        if labels is not None and c.label not in labels:
            continue
        if where is not None and not where(c):
            continue
        out.append(c.bare if bare else c)
    return out


def variants(rows: Iterable[Case], *, fd_scheme: Iterable = (None,),
             fisher: Iterable = (None,)) -> list[Case]:
    """Each row once per Fisher and (finite-difference rows only) per scheme."""
    out = []
    for c in rows:
        schemes = tuple(fd_scheme) if c.estimator == "finite_difference" else (c.fd_scheme,)
        for f, s in itertools.product(tuple(fisher), schemes):
            out.append(c.replace(fisher=f if f is not None else c.fisher, fd_scheme=s))
    return out


def get(label: str, *, bare=False) -> Case:
    """The case of a label, variants included: 'reng/kfac/fin_diff:central+mc'."""
    base, _, fisher = label.partition("+")
    base, _, scheme = base.partition(":")
    try:
        case = BY_LABEL[base]
    except KeyError:
        raise KeyError(f"no row {base!r} in the table: {sorted(BY_LABEL)}") from None
    case = case.replace(fd_scheme=scheme or None, fisher=fisher or None)
    return case.bare if bare else case


def build(label: str, **hp):
    """The core optimizer of a label with the builders' defaults and `hp`."""
    return get(label, bare=True).build(**hp)


def defaults(*, bare=True) -> list[Case]:
    """Each optimizer as its builder makes it by default (structure and estimator)."""
    return [select(optimizer=o, structure=DEFAULT_STRUCTURE[o], default_estimator=True,
                   bare=bare)[0] for o in OPTIMIZERS]


def quick() -> list[Case]:
    """The consistency suite's --quick subset: every structure, estimator, optimizer once."""
    return [BY_LABEL[label] for label in QUICK]


def pairs() -> list[tuple[str, str]]:
    """Every optimizer x structure, once each."""
    return [(c.optimizer, c.structure) for c in select(default_estimator=True)]


def ids(rows: Iterable[Case]) -> list[str]:
    return [c.id for c in rows]


def idfn(value) -> str | None:
    """For pytest's `ids=`: a case's id (other values: pytest's own)."""
    return value.id if isinstance(value, Case) else None


def optimizers(*, with_estimator: bool | None = None) -> tuple[str, ...]:
    """The optimizers of the table (with_estimator: only those that take `gr`, or not)."""
    return tuple(o for o in OPTIMIZERS
                 if with_estimator is None or (DEFAULT_ESTIMATOR[o] is not None) == with_estimator)
