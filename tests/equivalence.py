"""The adapters' equivalence with the core on the reference MLP, shared by tests/torch and
tests/jax: the problem (sizes, batches, sampled "mc" targets), the hyperparameters of a case,
the reference run (the core on NumPy with the hand-written gradients, statistics and HVPs of
grng_core.reference.MLP), the torch run (grng_torch on an nn.Sequential with the same weights)
and the comparison (relative 1e-10 per step and leaf, in float64).

A case is a row of tests/cases.py with its variants (finite-difference scheme, Fisher), the
loss a separate axis ("softmax_ce" or "mse").
"""

from __future__ import annotations

import numpy as np

import grng_core as gc
from grng_core.reference import MLP

SIZES = (5, 7, 6, 3)
B = 9
STEPS = 3
RTOL = 1e-10
LOSSES = ("softmax_ce", "mse")


def hyperparameters(case, *, cholesky: bool = False) -> dict:
    """The keywords of `case` in the equivalence runs (the same for the core, torch and JAX,
    so that every side can be compared with every other)."""
    hp = dict(structure=case.structure, fisher=case.fisher or "empirical", momentum=0.5,
              weight_decay=0.01)
    if cholesky:
        hp["inverse_method"] = "cholesky"
    if case.optimizer == "rkalman":
        hp.update(lr=0.3, rho=0.05, damping=1e-2, prior_var=0.5)
    else:
        hp.update(lr=0.2, rho=0.05, damping=1e-2)
    if case.structure == "diagonal":  # g/(v + λ) with a tiny λ makes steps that amplify round-off
        hp.update(damping=0.3)
    if case.estimator is not None:
        hp.update(gr=case.estimator, fd_scheme=case.fd_scheme or "forward", fd_radius=1e-3)
    return hp


def mlp(loss: str) -> MLP:
    return MLP(SIZES, activation="tanh", loss=loss)


def data(loss: str, seed: int):
    """STEPS batches: inputs, targets and the targets an "mc" Fisher samples."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((B, SIZES[0])) for _ in range(STEPS)]
    if loss == "softmax_ce":
        ys = [np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)] for _ in range(STEPS)]
        mc = [np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)] for _ in range(STEPS)]
    else:
        ys = [rng.standard_normal((B, SIZES[-1])) for _ in range(STEPS)]
        mc = [rng.standard_normal((B, SIZES[-1])) for _ in range(STEPS)]
    return xs, ys, mc


def reference_run(opt, mlp_, params, xs, ys, mc):
    """The core on the reference MLP (NumPy): per step, the updates it returns; and the final
    state."""
    r = opt.requirements
    layers = [gc.LayerSpec(*mlp_.layer_keys(k)) for k in range(mlp_.n_layers)]
    state = opt.init(params, layers=layers if opt.config.structure == "kfac" else None)
    out = []
    for step, (x, y, y_mc) in enumerate(zip(xs, ys, mc)):
        curvature, inverse = opt.flags(step)  # step: the steps already taken
        stat_targets = y_mc if r.fisher == "mc" else None
        stats = None
        if curvature and (r.layer_stats or r.per_example_grads):
            kind = "layers" if r.layer_stats else "per_example"
            stats = mlp_.stats(params, x, y, kind=kind, stat_targets=stat_targets)
        updates, state = opt.update(mlp_.grad(params, x, y), state, params, stats=stats,
                                    oracle=mlp_.oracle(x, y), curvature=curvature,
                                    inverse=inverse)
        params = gc.apply_updates(params, updates)
        out.append([np.asarray(u) for u in updates])
    return out, state


def torch_model(mlp_, params, loss):
    """nn.Sequential of Linear + Tanh with the reference's weights, and the loss module."""
    import grng_torch as gt
    import torch
    from torch import nn

    layers = []
    for k, (d_in, d_out) in enumerate(zip(mlp_.sizes[:-1], mlp_.sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if k < mlp_.n_layers - 1:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(v))
    if loss == "softmax_ce":
        loss_fn = nn.CrossEntropyLoss()  # probability targets: -Σ y log softmax(z)
    else:
        loss_fn = gt.LossModule(lambda z, y: 0.5 * ((z - y) ** 2).sum(-1).mean())
    return model, loss_fn


def torch_run(case, hp, mlp_, params, xs, ys, mc, loss):
    """grng_torch on the same weights and batches: per step, the parameter change; and the
    optimizer. The "mc" targets are handed over as `sample_targets`."""
    import torch

    model, loss_fn = torch_model(mlp_, params, loss)
    samples = iter(mc)
    opt = case.bare.torch(model.parameters(), model=model, loss_fn=loss_fn,
                          sample_targets=lambda out: torch.from_numpy(next(samples)), **hp)
    out = []
    for t, (x, y) in enumerate(zip(xs, ys)):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        before = [p.detach().clone() for p in model.parameters()]
        if opt.core(0).requirements.fisher != "mc" or not opt.core(0).flags(t)[0]:
            next(samples)  # keep the sample stream aligned with the reference's steps

        def closure(xt=xt, yt=yt):
            opt.zero_grad()
            loss_value = loss_fn(model(xt), yt)
            loss_value.backward()
            return loss_value

        opt.step(closure)
        out.append([(p.detach() - b).numpy() for p, b in zip(model.parameters(), before)])
    return out, opt


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_close(got, want, what: str = "") -> None:
    """Every step's every leaf within RTOL (relative, Frobenius)."""
    prefix = f"{what}: " if what else ""
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for k, (g, w) in enumerate(zip(g_step, w_step, strict=True)):
            assert g.shape == w.shape
            err = rel(g, w)
            assert err <= RTOL, f"{prefix}step {t}, leaf {k}: relative error {err:.2e}"
