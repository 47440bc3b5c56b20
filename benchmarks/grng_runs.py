"""GRNG rows of the suite: RENG, RING, R-Kalman and NGD (RENG with rho = 0) via ``grng_torch``.

Each row takes the structure that suits the task's model (``Task.structures``: ``kfac`` for the
MLP, the CNN and the transformer, whose Linear / Conv2d layers the adapter hooks; ``woodbury``,
the exact minibatch Fisher, for the single-layer logistic regression), passed explicitly, so
no row depends on an optimizer's default structure. RING runs in both forms, each its own row:
``form="adaptive_damping"`` (key ``ring``) and ``form="gauss_newton"`` (the same key +
``GN_SUFFIX``), whose sweep keeps rho * damping <= 1. ``--full`` adds variants: RENG with the
finite-difference estimator, RING (both forms) with the ``woodbury`` / ``diagonal`` structures
and with Cholesky inverses, and R-Kalman with the ``woodbury`` belief (pinned: its default is
``kfac`` now).
"""

from __future__ import annotations

from benchmarks.hyperparams import GN_SUFFIX, GRNG_BASE, RING_FORMS
from benchmarks.optspec import OptSpec
from benchmarks.steppers import GRNGStepper

ALGOS = {"reng": "RENG", "ring": "RING", "rkalman": "RKalman", "ngd": "RENG"}


def grng_hyperparameters(algo: str, structure: str, hp: dict) -> dict:
    """Keyword arguments of the grng_torch optimizer for a row's hyperparameters."""
    kw = {k: v for k, v in hp.items() if k not in ("algo",)}
    kw["structure"] = structure
    if algo == "ngd":
        kw["rho"] = 0.0
    return kw


def build_grng(algo: str, structure: str, model, hp: dict, flatten_targets: bool = False):
    import grng_torch
    from torch import nn

    cls = getattr(grng_torch, ALGOS[algo])
    loss_mod = nn.CrossEntropyLoss()
    opt = cls(model.parameters(), model=model, loss_fn=loss_mod,
              **grng_hyperparameters(algo, structure, hp))
    return GRNGStepper(model, loss_mod, opt, flatten_targets)


def _builder(algo: str, structure: str | None = None):
    def build(model, task, hp, seed):
        s = structure or task.structures[algo]
        return build_grng(algo, s, model, hp, flatten_targets=bool(task.seq_len))
    return build


def _tied_hybrid(model, task, hp, seed):
    from benchmarks.tied_hybrid import build
    return build(model, grng_hyperparameters("ring", task.structures["ring"], hp),
                 bool(task.seq_len))


def gauss_newton_ok(hp: dict) -> bool:
    """RING form='gauss_newton' needs 0 <= rho * damping <= 1 (adaptive_damping: no bound)."""
    return hp.get("form") != "gauss_newton" or hp["rho"] * hp["damping"] <= 1.0


def ring_rows(key: str, framework: str, base: dict, build, structure: str | None = None,
              variant: str = "", **kw) -> list[OptSpec]:
    """Two RING rows, one per form: ``key`` (adaptive_damping) and ``key + GN_SUFFIX``
    (gauss_newton, its sweep limited to rho * damping <= 1); the label names both the
    structure and the form, e.g. "RING (kfac, gauss_newton)"."""
    extra = {"algo": "ring", "variant": variant}
    if structure:
        extra["structure"] = structure
    return [OptSpec(key + ("" if form == "adaptive_damping" else GN_SUFFIX), "RING", framework,
                    "grng", dict(base, form=form), build, extra=dict(extra),
                    valid=gauss_newton_ok, **kw)
            for form in RING_FORMS]


#: Key suffix of the rows that run a GRNG optimizer at its recommended setting.
REC_SUFFIX = "_rec"


def recommended_rows(requires) -> list[OptSpec]:
    """RENG, RING (both forms) and R-Kalman at their recommended setting (the library's
    defaults, README "Defaults"; only the task's structure is passed): not swept, as a user
    runs them out of the box. Keys ``reng_rec``, ``ring_rec``, ``ring_rec_gn``,
    ``rkalman_rec``. Issue #15's wall-time targets are judged on these rows."""
    rows = [("reng", "RENG", {}), ("ring", "RING", {"form": "adaptive_damping"}),
            ("ring", "RING", {"form": "gauss_newton"}), ("rkalman", "R-Kalman", {})]
    return [OptSpec(key + REC_SUFFIX + (GN_SUFFIX if base.get("form") == "gauss_newton"
                                        else ""),
                    label, "torch", "grng", base, _builder(key), requires=requires, fixed=True,
                    extra={"algo": key, "variant": "defaults"},
                    note="the library's defaults, not swept (the form named explicitly)")
            for key, label, base in rows]


def specs() -> list[OptSpec]:
    req = ("grng_torch", "grng_core")
    base = GRNG_BASE
    ring = base["ring"]
    out = [
        OptSpec("reng", "RENG", "torch", "grng", dict(base["reng"]), _builder("reng"),
                requires=req, extra={"algo": "reng"},
                note="double-backprop GR (Hessian-vector product)"),
        *ring_rows("ring", "torch", ring, _builder("ring"), requires=req),
        OptSpec("rkalman", "R-Kalman", "torch", "grng", dict(base["rkalman"]),
                _builder("rkalman"), requires=req, extra={"algo": "rkalman"},
                note="finite-difference GR (forward); the kfac belief inverts no factor "
                     "(inverse_every unused), no direct refresh (kalman_refresh_every=None)"),
        OptSpec("ngd", "NGD", "torch", "grng", dict(base["ngd"]),
                _builder("ngd"), requires=req, extra={"algo": "ngd"},
                note="RENG with rho=0: damped natural gradient, the paper's baseline"),
        *recommended_rows(req),
        # --full variants
        OptSpec("ring_w0" + GN_SUFFIX, "RING", "torch", "grng",
                {"form": "gauss_newton", "refresh_warmup": 0}, _builder("ring"), requires=req,
                fixed=True, full_only=True,
                extra={"algo": "ring", "variant": "defaults, refresh_warmup=0"},
                note="the defaults without the refresh warm-up (README \"Choosing an "
                     "optimizer\"); not judged as a recommended setting"),
        OptSpec("ring_tied_adamw" + GN_SUFFIX, "RING", "torch", "grng",
                {"form": "gauss_newton"}, _tied_hybrid, requires=req, fixed=True,
                full_only=True, tasks=("gpt2_char",),
                extra={"algo": "ring", "variant": "defaults, tied weights on AdamW"},
                note="RING at its defaults on every parameter but the tied embedding, AdamW "
                     "(lr 1/600) on it (README \"Tied embeddings\")"),
        OptSpec("ring_m5kl03" + GN_SUFFIX, "RING", "torch", "grng",
                {"form": "gauss_newton", "momentum": 0.5, "kl_clip": 3e-4}, _builder("ring"),
                requires=req, fixed=True, full_only=True,
                extra={"algo": "ring", "variant": "defaults, momentum=0.5, kl_clip=3e-4"},
                note="heavy-ball momentum with a tighter trust region (README \"Tied "
                     "embeddings\"); not the defaults: the torch zoo's batch-8 transformers "
                     "pass fewer of benchmarks.defaults_sweep's runs with it"),
        OptSpec("reng_fd", "RENG", "torch", "grng",
                dict(base["reng"], gr="finite_difference"), _builder("reng"), requires=req,
                full_only=True, extra={"algo": "reng", "variant": "finite diff."},
                note="finite-difference GR (forward)"),
        *ring_rows("ring_woodbury", "torch", ring, _builder("ring", "woodbury"), "woodbury",
                   requires=req, full_only=True, tasks=("digits_mlp", "digits_cnn")),
        *ring_rows("ring_diagonal", "torch", ring, _builder("ring", "diagonal"), "diagonal",
                   requires=req, full_only=True),
        *ring_rows("ring_chol", "torch", dict(ring, inverse_method="cholesky"),
                   _builder("ring"), variant="Cholesky", requires=req, full_only=True,
                   tasks=("digits_mlp", "digits_cnn", "char_lm"),
                   note="inverse_method='cholesky' instead of Newton-Schulz"),
        OptSpec("rkalman_woodbury", "R-Kalman", "torch", "grng",
                dict(base["rkalman"]), _builder("rkalman", "woodbury"), requires=req,
                full_only=True, tasks=("digits_mlp", "digits_cnn"),
                extra={"algo": "rkalman", "structure": "woodbury"},
                note="woodbury belief, pinned (R-Kalman's default is kfac)"),
    ]
    return out
