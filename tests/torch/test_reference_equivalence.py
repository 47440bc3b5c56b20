"""In float64 the torch adapter on an nn.Sequential MLP takes the core's step on the reference
MLP (grng_core.reference, hand-written gradients, statistics and HVPs) with the same weights
and batches, to a relative 1e-10: for every optimizer x structure x GR estimator x Fisher.

The reference side runs the core on NumPy arrays; the torch side runs only grng_torch (hooks,
torch.func per-example gradients, double backprop, closure re-evaluation). For fisher="mc"
both sides use the same sampled targets (handed to the adapter as `sample_targets`).
"""

from __future__ import annotations

import itertools

import grng_torch as gt
import numpy as np
import pytest
import torch
from torch import nn

import grng_core as gc
from grng_core.reference import MLP

SIZES = (5, 7, 6, 3)
B = 9
STEPS = 3
RTOL = 1e-10

STRUCTURES = ("kfac", "diagonal", "woodbury")
CASES = []
for algo, structure, fisher in itertools.product(("reng", "ring", "rkalman"), STRUCTURES,
                                                 ("empirical", "mc")):
    grs = [None] if algo == "ring" else [("double_backprop", "forward"),
                                         ("finite_difference", "forward"),
                                         ("finite_difference", "central")]
    for gr in grs:
        CASES.append((algo, structure, fisher, gr))


def _case_id(case):
    algo, structure, fisher, gr = case
    tail = "" if gr is None else f"-{gr[0]}" + ("" if gr[1] == "forward" else f"-{gr[1]}")
    return f"{algo}-{structure}-{fisher}{tail}"


def _hyper(algo, structure, fisher, gr):
    hp = dict(structure=structure, fisher=fisher, momentum=0.5, weight_decay=0.01)
    if algo == "rkalman":
        hp.update(lr=0.3, rho=0.05, damping=1e-2, prior_var=0.5)
    else:
        hp.update(lr=0.2, rho=0.05, damping=1e-2)
    if structure == "diagonal":  # g/(v + λ) with a tiny λ makes steps that amplify round-off
        hp.update(damping=0.3)
    if gr is not None:
        hp.update(gr=gr[0], fd_scheme=gr[1], fd_radius=1e-3)
    return hp


def _torch_model(mlp, params, loss):
    layers = []
    for k, (d_in, d_out) in enumerate(zip(mlp.sizes[:-1], mlp.sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if k < mlp.n_layers - 1:
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


def _data(loss, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((B, SIZES[0])) for _ in range(STEPS)]
    if loss == "softmax_ce":
        ys = [np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)] for _ in range(STEPS)]
        mc = [np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)] for _ in range(STEPS)]
    else:
        ys = [rng.standard_normal((B, SIZES[-1])) for _ in range(STEPS)]
        mc = [rng.standard_normal((B, SIZES[-1])) for _ in range(STEPS)]
    return xs, ys, mc


def _reference_run(opt, mlp, params, xs, ys, mc):
    """The core on the reference MLP (NumPy): per step, the updates it returns."""
    r = opt.requirements
    layers = [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]
    state = opt.init(params, layers=layers if opt.config.structure == "kfac" else None)
    out = []
    for t, (x, y, y_mc) in enumerate(zip(xs, ys, mc), start=1):
        curvature, inverse = opt.flags(t - 1)
        stat_targets = y_mc if r.fisher == "mc" else None
        stats = None
        if curvature and (r.layer_stats or r.per_example_grads):
            kind = "layers" if r.layer_stats else "per_example"
            stats = mlp.stats(params, x, y, kind=kind, stat_targets=stat_targets)
        updates, state = opt.update(mlp.grad(params, x, y), state, params, stats=stats,
                                    oracle=mlp.oracle(x, y), curvature=curvature,
                                    inverse=inverse)
        params = gc.apply_updates(params, updates)
        out.append([np.asarray(u) for u in updates])
    return out, state


def _torch_run(cls, hp, mlp, params, xs, ys, mc, loss):
    model, loss_fn = _torch_model(mlp, params, loss)
    samples = iter(mc)
    opt = cls(model.parameters(), model=model, loss_fn=loss_fn,
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


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# every case with softmax cross-entropy; the empirical, non-central ones with mse as well
PARAMS = [(c, "softmax_ce") for c in CASES] + [
    (c, "mse") for c in CASES if c[2] == "empirical" and (c[3] is None or c[3][1] != "central")]


@pytest.mark.parametrize("case, loss", PARAMS, ids=[f"{l}-{_case_id(c)}" for c, l in PARAMS])
def test_torch_step_equals_core_on_reference_mlp(case, loss):
    algo, structure, fisher, gr = case
    hp = _hyper(*case)
    mlp = MLP(SIZES, activation="tanh", loss=loss)
    params = mlp.init(seed=3)
    xs, ys, mc = _data(loss, seed=7)
    factory = {"reng": gc.reng, "ring": gc.ring, "rkalman": gc.rkalman}[algo]
    want, _ = _reference_run(factory(**hp), mlp, params, xs, ys, mc)
    cls = {"reng": gt.RENG, "ring": gt.RING, "rkalman": gt.RKalman}[algo]
    got, opt = _torch_run(cls, hp, mlp, params, xs, ys, mc, loss)
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for k, (g, w) in enumerate(zip(g_step, w_step, strict=True)):
            assert g.shape == w.shape
            err = _rel(g, w)
            assert err <= RTOL, f"step {t}, leaf {k}: relative error {err:.2e}"


def test_adapter_collects_reference_statistics():
    """The hooks' K-FAC rows and the torch.func per-example gradients are the reference's."""
    mlp = MLP(SIZES, activation="tanh", loss="softmax_ce")
    params = mlp.init(seed=1)
    xs, ys, _ = _data("softmax_ce", seed=2)
    model, loss_fn = _torch_model(mlp, params, "softmax_ce")
    seen = {}

    class Spy(gt.RENG):
        pass

    opt = Spy(model.parameters(), model=model, loss_fn=loss_fn, structure="kfac", rho=0.0)
    core_update = opt.core(0).update

    def spy_update(grads, state, params_, stats=None, **kw):
        seen["stats"] = stats
        return core_update(grads, state, params_, stats=stats, **kw)

    object.__setattr__(opt.core(0), "update", spy_update)
    x, y = torch.from_numpy(xs[0]), torch.from_numpy(ys[0])

    def closure():
        opt.zero_grad()
        value = loss_fn(model(x), y)
        value.backward()
        return value

    from grng_torch._functional import per_example_grads

    names = [n for n, _ in model.named_parameters()]
    pe = per_example_grads(model, names, (x,), {}, y, B, loss_fn)
    opt.step(closure)
    ref = mlp.stats(params, xs[0], ys[0], kind="both")
    assert len(seen["stats"].layers) == len(ref.layers)
    for got, want in zip(seen["stats"].layers, ref.layers):
        assert (got.weight, got.bias) == (want.weight, want.bias)
        assert _rel(got.inputs.numpy(), want.inputs) < 1e-13
        assert _rel(got.output_grads.numpy(), want.output_grads) < 1e-13
    for n, want in zip(names, ref.per_example_grads):
        assert _rel(pe[n].numpy(), want) < 1e-13
