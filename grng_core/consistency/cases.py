"""The table of optimizer configurations: optimizer x structure x estimator (one row each),
used by `python -m grng_core.consistency` and by the test suites of the core and adapters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """One optimizer setting: builder name, structure, estimator (None for RING), keywords,
    and RING's form (§3.2; labelled "-" for gauss_newton, "adaptive" for adaptive_damping)."""

    optimizer: str
    structure: str
    estimator: str | None
    kwargs: tuple = ()
    form: str | None = None

    @property
    def label(self) -> str:
        est = {"double_backprop": "double_bp", "finite_difference": "fin_diff", None: "-"}
        last = "adaptive" if self.form == "adaptive_damping" else est[self.estimator]
        return f"{self.optimizer}/{self.structure}/{last}"

    def build(self):
        import grng_core as gc

        kw = dict(self.kwargs)
        if self.estimator is not None:
            kw["gr"] = self.estimator
        if self.form is not None:
            kw["form"] = self.form
        return getattr(gc, self.optimizer)(structure=self.structure, **kw)


# the KL trust region off (None), statistics every step, no refresh warm-up: the table checks
# §2–§3's math across backends, and its figures in the README were made so (the defaults are
# measured on the model zoo)
_EVERY = (("kl_clip", None), ("curvature_every", 1), ("refresh_warmup", 0))
_BASE: dict[str, tuple[tuple[str, float | None], ...]] = {
    "ring": (("lr", 0.1), ("rho", 0.05), ("damping", 1e-2), ("momentum", 0.5),
             ("inverse_every", 2), *_EVERY),
    "reng": (("lr", 0.1), ("rho", 0.05), ("damping", 1e-2), ("momentum", 0.5),
             ("inverse_every", 2), *_EVERY),
    "rkalman": (("lr", 0.2), ("rho", 0.05), ("damping", 1e-2), ("inverse_every", 1), *_EVERY),
}


QUICK = ("ring/kfac/-", "ring/kfac/adaptive", "ring/woodbury/-", "reng/diagonal/fin_diff",
         "reng/woodbury/double_bp", "rkalman/kfac/fin_diff", "rkalman/woodbury/double_bp")


def quick_configs() -> list[Config]:
    """A representative subset (every structure, estimator and optimizer once) for --quick."""
    by_label = {c.label: c for c in default_configs()}
    return [by_label[k] for k in QUICK]


def default_configs() -> list[Config]:
    """Every optimizer x structure x estimator (RING: x form): 6 RING + 6 RENG + 6 R-Kalman."""
    out: list[Config] = []
    for name in ("ring", "reng", "rkalman"):
        for structure in ("kfac", "diagonal", "woodbury"):
            kw = _BASE[name]
            if structure == "diagonal" and name != "rkalman":
                kw = tuple((k, 0.01 if k == "lr" else v) for k, v in kw)
            if name == "ring":
                out.extend(Config(name, structure, None, kw, form)
                           for form in ("gauss_newton", "adaptive_damping"))
                continue
            out.extend(Config(name, structure, e, kw) for e in ("double_backprop",
                                                                  "finite_difference"))
    return out
