"""Torch rows of the suite other than GRNG: the ``torch.optim`` baselines (SGD with momentum,
AdamW) and the peers, each the real package's code driven the way its documentation shows:

- K-FAC: ASDL (PyPI ``asdfghjkl``, ``import asdl``), ``KfacGradientMaker`` + ``torch.optim.SGD``.
- SophiaH and SAM: ``pytorch_optimizer`` (PyPI ``pytorch-optimizer``).
- IVON: ``ivon`` (PyPI ``ivon-opt``).
- PSGDKron, SOAP, Muon: ``heavyball`` (``--full`` only; ``heavyball.utils.compile_mode = None``
  since torch.compile is not worth it on a CPU).
"""

from __future__ import annotations

import torch

from benchmarks.hyperparams import (
    ADAMW_WD,
    EMA_DECAY,
    KFAC_DAMPING,
    KFAC_LR,
    MOMENTUM,
    REFRESH_EVERY,
)
from benchmarks.losses import task_loss
from benchmarks.optspec import OptSpec
from benchmarks.steppers import (
    ASDLKfacStepper,
    IVONStepper,
    SAMStepper,
    SophiaStepper,
    TorchStepper,
)


def _sgd(model, task, hp, seed):
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
    return TorchStepper(model, task_loss(task), opt)


def _adamw(model, task, hp, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    return TorchStepper(model, task_loss(task), opt)


def _cpu_nvtx_noop():
    """ASDL wraps its work in CUDA NVTX profiler ranges, which raise on a CPU-only torch build;
    make them no-ops there (they only label profiler timelines)."""
    import contextlib

    from torch.cuda import nvtx

    if torch.cuda.is_available() or getattr(nvtx, "_grng_bench_noop", False):
        return

    @contextlib.contextmanager
    def _range(msg, *args, **kwargs):
        yield

    nvtx.range = _range
    nvtx.range_push = lambda msg: 0
    nvtx.range_pop = lambda: 0
    nvtx._grng_bench_noop = True


def _asdl_kfac(model, task, hp, seed):
    _cpu_nvtx_noop()
    from asdl import FISHER_EMP, KfacGradientMaker, PreconditioningConfig

    cfg = PreconditioningConfig(
        data_size=task.batch_size, damping=hp["damping"],
        preconditioner_upd_interval=hp["refresh_every"],
        curvature_upd_interval=hp["refresh_every"],
        ema_decay=1.0 - hp["ema_decay"],  # ASDL's decay is the weight of the new statistics
        ignore_modules=[torch.nn.LayerNorm, torch.nn.Embedding],
    )
    gm = KfacGradientMaker(model, cfg, fisher_type=hp.get("fisher", FISHER_EMP), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
    # ASDL calls the loss module itself and needs its `reduction` attribute
    return ASDLKfacStepper(model, torch.nn.CrossEntropyLoss(), opt, gm, bool(task.seq_len))


def _sophia(model, task, hp, seed):
    from pytorch_optimizer import SophiaH

    opt = SophiaH(model.parameters(), lr=hp["lr"], update_period=hp["update_period"])
    return SophiaStepper(model, task_loss(task), opt)


def _sam(model, task, hp, seed):
    from pytorch_optimizer import SAM

    opt = SAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], lr=hp["lr"],
              momentum=hp["momentum"])
    return SAMStepper(model, task_loss(task), opt)


def _ivon(model, task, hp, seed):
    import ivon

    opt = ivon.IVON(model.parameters(), lr=hp["lr"], ess=task.n_train,
                    hess_init=hp["hess_init"], weight_decay=hp["weight_decay"])
    return IVONStepper(model, task_loss(task), opt)


def _heavyball(name):
    def build(model, task, hp, seed):
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None
        opt = getattr(heavyball, name)(model.parameters(), lr=hp["lr"])
        return TorchStepper(model, task_loss(task), opt)
    return build


def specs() -> list[OptSpec]:
    """The baseline and peer rows (torch), in the order of the tables."""
    return [
        OptSpec("sgd", "SGD (momentum)", "torch", "baseline",
                {"lr": 0.3, "momentum": MOMENTUM}, _sgd),
        OptSpec("adamw", "AdamW", "torch", "baseline",
                {"lr": 5e-3, "weight_decay": ADAMW_WD}, _adamw),
        OptSpec("asdl_kfac", "K-FAC (ASDL)", "torch", "peer",
                {"lr": KFAC_LR, "damping": KFAC_DAMPING, "momentum": MOMENTUM,
                 "refresh_every": REFRESH_EVERY, "ema_decay": EMA_DECAY},
                _asdl_kfac, requires=("asdl",),
                note="empirical Fisher (as GRNG's default), curvature and inverse every "
                     f"{REFRESH_EVERY} steps; its CUDA NVTX profiler ranges are made no-ops on "
                     "a CPU-only torch, where they raise"),
        OptSpec("sophiah", "SophiaH", "torch", "peer",
                {"lr": 0.1, "update_period": REFRESH_EVERY}, _sophia,
                requires=("pytorch_optimizer",)),
        OptSpec("sam", "SAM (SGD)", "torch", "peer",
                {"lr": 0.05, "rho": 0.05, "momentum": MOMENTUM}, _sam,
                requires=("pytorch_optimizer",)),
        OptSpec("ivon", "IVON", "torch", "peer",
                {"lr": 1.0, "hess_init": 0.1, "weight_decay": 1e-4}, _ivon,
                requires=("ivon",)),
        OptSpec("psgd_kron", "PSGDKron (heavyball)", "torch", "peer", {"lr": 1e-3},
                _heavyball("PSGDKron"), requires=("heavyball",), full_only=True),
        OptSpec("soap", "SOAP (heavyball)", "torch", "peer", {"lr": 3e-3},
                _heavyball("SOAP"), requires=("heavyball",), full_only=True),
        OptSpec("muon", "Muon (heavyball)", "torch", "peer", {"lr": 0.02},
                _heavyball("Muon"), requires=("heavyball",), full_only=True),
    ]
