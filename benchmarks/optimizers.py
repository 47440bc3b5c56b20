"""The optimizers of the suite: GRNG (through ``grng_torch``), torch.optim baselines and peers.

Every peer is the real package's code, driven the way its documentation shows:

- K-FAC: ASDL (PyPI ``asdfghjkl``, ``import asdl``), ``KfacGradientMaker`` + ``torch.optim.SGD``.
- SophiaH and SAM: ``pytorch_optimizer`` (PyPI ``pytorch-optimizer``).
- IVON: ``ivon`` (PyPI ``ivon-opt``).
- PSGDKron, SOAP, Muon: ``heavyball`` (``--full`` only; ``heavyball.utils.compile_mode = None``
  since torch.compile is not worth it on a CPU).
- JAX rows (``optax.adamw``, ``kfac-jax``) live in :mod:`benchmarks.jax_runs`.

A *stepper* owns the model's optimizer and does one training step on a batch:
``stepper.step(x, y) -> float`` (the batch loss before the update). The harness times it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# lr and damping sweeps: the same multiplicative grid around each optimizer's base value.
SWEEPS = {
    "quick": {"lr": (1.0,), "damping": (1.0,)},
    "default": {"lr": (1 / 3, 1.0, 3.0), "damping": (0.1, 1.0, 10.0)},
    "full": {"lr": (1 / 3, 1.0, 3.0), "damping": (0.1, 1.0, 10.0)},
}

#: Refresh interval of curvature and inverses for every K-FAC-type method (GRNG, ASDL, kfac-jax).
REFRESH_EVERY = 10
#: EMA decay of curvature factors for every K-FAC-type method.
EMA_DECAY = 0.95
#: Momentum used by every SGD-type method (SGD, SAM's base SGD, ASDL K-FAC's SGD, GRNG).
MOMENTUM = 0.9
#: Base lr and damping of every K-FAC-type method (GRNG, NGD, ASDL K-FAC, kfac-jax): the same
#: sweep grid for all of them.
KFAC_LR, KFAC_DAMPING = 0.1, 0.3
#: AdamW weight decay (torch and optax alike).
ADAMW_WD = 1e-4


@dataclass
class OptSpec:
    key: str  # unique row key, e.g. "ring"
    label: str  # table label, e.g. "RING (kfac)"
    framework: str  # "torch" or "jax"
    group: str  # "grng", "baseline" or "peer"
    base: dict  # base hyperparameters; "lr" and "damping" are swept
    build: Callable  # (model, task, hp, seed) -> stepper  (torch); jax: see jax_runs
    requires: tuple = ()  # importable modules needed
    full_only: bool = False
    tasks: tuple | None = None  # None = every task
    note: str = ""
    extra: dict = field(default_factory=dict)

    def label_for(self, task) -> str:
        """The row label; a GRNG row without a fixed structure names the task's."""
        algo = self.extra.get("algo")
        if algo and "structure" not in self.base:
            variant = self.extra.get("variant")
            return f"{self.label} ({task.structures[algo]}{', ' + variant if variant else ''})"
        return self.label

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def sweep_grid(self, preset: str, task=None) -> list[dict]:
        """Hyperparameter settings of the sweep: base values times the grid's multipliers
        (a task may narrow the grid: ``Task.sweep``, e.g. the char LM's damping)."""
        grid = dict(SWEEPS[preset])
        if task is not None and task.sweep:
            grid.update(task.sweep)
        out = []
        for lm in grid["lr"]:
            dms = grid["damping"] if "damping" in self.base else (None,)
            for dm in dms:
                hp = dict(self.base)
                hp["lr"] = _round(self.base["lr"] * lm)
                if dm is not None:
                    hp["damping"] = _round(self.base["damping"] * dm)
                out.append(hp)
        return out


def _round(x: float) -> float:
    return float(f"{x:.3g}")


# ---------------------------------------------------------------------------------------------
# torch steppers


class TorchStepper:
    """One optimizer on one torch model; ``step`` does forward, backward and the update."""

    def __init__(self, model, loss_fn, opt):
        self.model, self.loss_fn, self.opt = model, loss_fn, opt

    def step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()

    def optimizers(self):
        return [self.opt]


class SophiaStepper(TorchStepper):
    """SophiaH estimates the Hessian diagonal by Hutchinson: the backward keeps its graph."""

    def step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward(create_graph=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # breaks the grad <-> graph reference cycle
        return loss.item()


class SAMStepper(TorchStepper):
    """SAM: ascent step to w + rho g/|g|, gradient there, base-optimizer step from w."""

    def step(self, x, y) -> float:
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.first_step(zero_grad=True)
        self.loss_fn(self.model(x), y).backward()
        self.opt.second_step(zero_grad=True)
        return loss.item()


class IVONStepper(TorchStepper):
    """IVON: the gradient is taken at weights sampled from the variational posterior."""

    def step(self, x, y) -> float:
        with self.opt.sampled_params(train=True):
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
        self.opt.step()
        return loss.item()


class ASDLKfacStepper(TorchStepper):
    """ASDL K-FAC: its gradient maker runs forward + backward, collects the Kronecker
    factors on curvature steps and replaces .grad by the preconditioned gradient; then SGD."""

    def __init__(self, model, loss_fn, opt, gm, flatten_targets: bool = False):
        super().__init__(model, loss_fn, opt)
        self.gm, self.flatten = gm, flatten_targets

    def step(self, x, y) -> float:
        if self.flatten:
            y = y.reshape(-1)
        self.opt.zero_grad(set_to_none=True)
        dummy_y = self.gm.setup_model_call(self.model, x)
        self.gm.setup_loss_call(self.loss_fn, dummy_y, y)
        _, loss = self.gm.forward_and_backward()
        self.opt.step()
        return loss.item()


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


def task_loss(task):
    """Mean cross-entropy; targets of a sequence task are flattened like the logits."""
    import torch.nn.functional as F

    if task.seq_len:
        return lambda out, y: F.cross_entropy(out, y.reshape(-1))
    return F.cross_entropy


# ---------------------------------------------------------------------------------------------
# the registry

def _grng_specs():
    from benchmarks import grng_runs

    return grng_runs.specs()


def all_specs() -> list[OptSpec]:
    """Every optimizer row, GRNG first (the order of the tables)."""
    from benchmarks import jax_runs

    specs = list(_grng_specs())
    specs += [
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
    specs += jax_runs.specs()
    return specs


def select_specs(preset: str, names: list[str] | None = None) -> list[OptSpec]:
    specs = all_specs()
    if names:
        known = {s.key for s in specs}
        bad = [n for n in names if n not in known]
        if bad:
            raise SystemExit(f"unknown optimizer(s) {bad}; known: {', '.join(sorted(known))}")
        return [s for s in specs if s.key in names]
    return [s for s in specs if preset == "full" or not s.full_only]
