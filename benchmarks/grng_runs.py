"""GRNG rows of the suite: RENG, RING, R-Kalman and NGD (RENG with rho = 0) via ``grng_torch``.

Each row takes the structure that suits the task's model (``Task.structures``: ``kfac`` for the
MLP, the CNN and the transformer, whose Linear / Conv2d layers the adapter hooks; ``woodbury``,
the exact minibatch Fisher, for the single-layer logistic regression). ``--full`` adds
variants: RENG with the finite-difference estimator, RING with the ``woodbury`` / ``diagonal``
structures, R-Kalman with its default ``woodbury`` belief, and RING kfac with Cholesky inverses.
"""

from __future__ import annotations

from benchmarks.hyperparams import GRNG_BASE
from benchmarks.optspec import OptSpec
from benchmarks.steppers import TorchStepper

ALGOS = {"reng": "RENG", "ring": "RING", "rkalman": "RKalman", "ngd": "RENG"}


class GRNGStepper(TorchStepper):
    """``opt.step(closure)``: the closure zeroes the grads, runs the model and the loss module
    and calls ``backward``; the optimizer calls it again where its algorithm needs to."""

    def __init__(self, model, loss_mod, opt, flatten_targets: bool):
        super().__init__(model, loss_mod, opt)
        self.flatten = flatten_targets

    def step(self, x, y) -> float:
        if self.flatten:
            y = y.reshape(-1)
        model, loss_mod, opt = self.model, self.loss_fn, self.opt

        def closure():
            opt.zero_grad()
            loss = loss_mod(model(x), y)
            loss.backward()
            return loss

        return float(opt.step(closure).detach())


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


def specs() -> list[OptSpec]:
    req = ("grng_torch", "grng_core")
    base = GRNG_BASE
    out = [
        OptSpec("reng", "RENG", "torch", "grng", dict(base["reng"]), _builder("reng"),
                requires=req, extra={"algo": "reng"},
                note="double-backprop GR (Hessian-vector product)"),
        OptSpec("ring", "RING", "torch", "grng", dict(base["ring"]), _builder("ring"),
                requires=req, extra={"algo": "ring"}),
        OptSpec("rkalman", "R-Kalman", "torch", "grng", dict(base["rkalman"]),
                _builder("rkalman"), requires=req, extra={"algo": "rkalman"},
                note="finite-difference GR (forward)"),
        OptSpec("ngd", "NGD", "torch", "grng", dict(base["ngd"]),
                _builder("ngd"), requires=req, extra={"algo": "ngd"},
                note="RENG with rho=0: damped natural gradient, the paper's baseline"),
        # --full variants
        OptSpec("reng_fd", "RENG", "torch", "grng",
                dict(base["reng"], gr="finite_difference"), _builder("reng"), requires=req,
                full_only=True, extra={"algo": "reng", "variant": "finite diff."},
                note="finite-difference GR (forward)"),
        OptSpec("ring_woodbury", "RING (woodbury)", "torch", "grng", dict(base["ring"]),
                _builder("ring", "woodbury"), requires=req, full_only=True,
                tasks=("digits_mlp", "digits_cnn")),
        OptSpec("ring_diagonal", "RING (diagonal)", "torch", "grng", dict(base["ring"]),
                _builder("ring", "diagonal"), requires=req, full_only=True),
        OptSpec("ring_chol", "RING", "torch", "grng",
                dict(base["ring"], inverse_method="cholesky"), _builder("ring"),
                requires=req, full_only=True, extra={"algo": "ring", "variant": "Cholesky"},
                tasks=("digits_mlp", "digits_cnn", "char_lm"),
                note="inverse_method='cholesky' instead of Newton-Schulz"),
        OptSpec("rkalman_woodbury", "R-Kalman (woodbury)", "torch", "grng",
                dict(base["rkalman"]), _builder("rkalman", "woodbury"), requires=req,
                full_only=True, tasks=("digits_mlp", "digits_cnn")),
    ]
    return out
