"""One shared suite, driven by the OptimizerInfo table in _util.py (the rows of tests/cases.py:
optimizer x structure x GR estimator, with Fisher and scheme variants), and by dtype where the
dtype matters.

- the loss falls on a small problem (float32, float64, bfloat16);
- param groups behave like separate optimizers;
- schedulers change the step (the core sees group["lr"]);
- state_dict round trip resumes bit-identically;
- bad hyperparameters and a missing closure raise clear errors.
"""

from __future__ import annotations

import io

import grng_torch as gt
import pytest
import torch
from torch import nn

from tests.torch._util import (
    DTYPES,
    OPTIMIZERS,
    Problem,
    closure_for,
    entry,
    flat,
    full_loss,
    ids,
    step_on,
    train,
)

PROBLEM = Problem()
CRIT = nn.CrossEntropyLoss()


def _make(info, dtype=torch.float32, seed=0, **overrides):
    model = PROBLEM.model(dtype, seed=seed)
    return model, info.make(model.parameters(), model, CRIT, **overrides)


# --------------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_loss_falls(info, dtype):
    dt = DTYPES[dtype]
    model, opt = _make(info, dt)
    before = full_loss(model, CRIT, PROBLEM, dt)
    losses = train(opt, model, CRIT, PROBLEM, dt, steps=15)
    after = full_loss(model, CRIT, PROBLEM, dt)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.75 * before, (before, after)
    for p in model.parameters():
        assert p.dtype == dt
    state = opt.state[next(iter(model.parameters()))]["grng"].core
    floats = [x for x in torch.utils._pytree.tree_leaves(state)
              if isinstance(x, torch.Tensor) and x.is_floating_point()]
    want = torch.float64 if dt == torch.float64 else torch.float32
    assert all(x.dtype == want for x in floats)  # state in at least float32


# ---------------------------------------------------------------- param groups
def _split_groups(model):
    first, second = model[0], model[2]
    return [list(first.parameters()), list(second.parameters())]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_param_groups_behave_like_separate_optimizers(info):
    """Where nothing reads the whole model (ρ = 0, no trust region), two groups with their
    own lr / weight decay in one optimizer take the steps two optimizers, each owning one
    group and seeing the same gradients, take. (With ρ > 0 or the trust region the groups
    read the whole model's ‖g‖², H·g and ⟨d, ĝ⟩: tests/torch/test_param_groups.py.)"""
    dt = torch.float64
    lr = info.kwargs.get("lr", 0.1)
    group_hp = [dict(lr=lr, weight_decay=0.0, rho=0.0, kl_clip=None),
                dict(lr=0.5 * lr, weight_decay=0.01, rho=0.0, kl_clip=None)]
    one = PROBLEM.model(dt)
    g1, g2 = _split_groups(one)
    opt = info.make([{"params": g1, **group_hp[0]}, {"params": g2, **group_hp[1]}], one, CRIT)

    two = PROBLEM.model(dt)
    h1, h2 = _split_groups(two)
    opts = [info.make(h1, two, CRIT, **group_hp[0]), info.make(h2, two, CRIT, **group_hp[1])]
    batches = list(PROBLEM.batches(dt))
    for k in range(6):
        x, y = batches[k % len(batches)]
        torch.manual_seed(k)
        opt.step(closure_for(opt, one, CRIT, x, y))
        start = [p.detach().clone() for p in two.parameters()]
        moved = []
        for o, own in zip(opts, (h1, h2)):
            with torch.no_grad():
                for p, s in zip(two.parameters(), start):
                    p.copy_(s)
            torch.manual_seed(k)
            o.step(closure_for(o, two, CRIT, x, y))
            moved.append([p.detach().clone() for p in own])
        with torch.no_grad():
            for own, values in zip((h1, h2), moved):
                for p, v in zip(own, values):
                    p.copy_(v)
        diff = (flat(one) - flat(two)).norm() / flat(one).norm()
        assert diff < 1e-10, (k, float(diff))


def test_groups_may_differ_weight_decay_on_biases():
    """The usual split: weights with decay, biases without (a K-FAC layer's weight and
    bias in different groups: the weight keeps K-FAC, the bias group is diagonal)."""
    model = PROBLEM.model(torch.float32)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = gt.RING([{"params": decay, "weight_decay": 0.01},
                   {"params": no_decay, "weight_decay": 0.0}], lr=0.2, damping=1e-2,
                  model=model)
    before = full_loss(model, CRIT, PROBLEM, torch.float32)
    train(opt, model, CRIT, PROBLEM, torch.float32, steps=15)
    assert full_loss(model, CRIT, PROBLEM, torch.float32) < 0.75 * before
    assert opt.state[decay[0]]["grng"].structure == "kfac"
    assert opt.state[decay[0]]["grng"].layers == [[0, None], [1, None]]
    assert opt.state[no_decay[0]]["grng"].structure == "diagonal"
    assert opt.param_groups[1]["structure"] == "kfac"  # the user's value is kept


# ------------------------------------------------------------------ schedulers
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_scheduler_changes_the_step(info):
    """StepLR halves group["lr"] after the first step: the second step is exactly half the
    second step of a run without the scheduler (the state does not depend on lr)."""
    dt = torch.float64
    steps = []
    for with_scheduler in (False, True):
        model, opt = _make(info, dt, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) \
            if with_scheduler else None
        train(opt, model, CRIT, PROBLEM, dt, steps=1, scheduler=sched)
        before = flat(model)
        train(opt, model, CRIT, PROBLEM, dt, steps=1, seed_base=1)
        steps.append(flat(model) - before)
        if with_scheduler:
            assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * opt.defaults["lr"])
            assert opt.core(0).config.lr == opt.param_groups[0]["lr"]
    full, half = steps
    assert full.norm() > 0
    assert (half - 0.5 * full).norm() <= 1e-9 * full.norm()


def test_every_scheduler_kind_runs():
    model, opt = _make(entry("ring/kfac/-"))
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
              torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=20,
                                                  cycle_momentum=False),
              torch.optim.lr_scheduler.ReduceLROnPlateau(opt)]
    batches = list(PROBLEM.batches(torch.float32))
    seen = set()
    for k in range(5):
        x, y = batches[k % len(batches)]
        loss = opt.step(closure_for(opt, model, CRIT, x, y))
        scheds[0].step()
        scheds[1].step()
        scheds[2].step(float(loss.detach()))
        seen.add(opt.core(0).config.lr)
    assert len(seen) == 5


def test_momentum_switched_on_after_the_first_step_starts_from_zero_buffers():
    """OneCycleLR-style: momentum 0 for two steps, then 0.9. The third step's buffers are
    created as zeros, so its update is the plain direction (m = 0.9·0 + d) and the fourth is
    0.9·d₃ + d₄: the same steps as an optimizer built with momentum 0.9 from the start whose
    buffers were zero before step 3, compared with a twin that keeps momentum 0."""
    model, opt = _make(entry("ring/kfac/-"), torch.float64)
    twin, twin_opt = _make(entry("ring/kfac/-"), torch.float64)
    train(opt, model, CRIT, PROBLEM, torch.float64, steps=2)
    train(twin_opt, twin, CRIT, PROBLEM, torch.float64, steps=2)
    opt.param_groups[0]["momentum"] = 0.9
    before = [p.detach().clone() for p in model.parameters()]
    train(opt, model, CRIT, PROBLEM, torch.float64, steps=1)
    train(twin_opt, twin, CRIT, PROBLEM, torch.float64, steps=1)  # momentum 0: the plain step
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)  # zero buffers: m = d
    assert opt.group_state(0).core.momentum is not None
    d3 = [p.detach() - b for p, b in zip(model.parameters(), before)]
    before = [p.detach().clone() for p in model.parameters()]
    twin_before = [p.detach().clone() for p in twin.parameters()]
    train(opt, model, CRIT, PROBLEM, torch.float64, steps=1)
    train(twin_opt, twin, CRIT, PROBLEM, torch.float64, steps=1)
    for p, b, q, qb, d in zip(model.parameters(), before, twin.parameters(), twin_before, d3):
        assert torch.allclose(p - b, 0.9 * d + (q - qb), rtol=1e-9, atol=1e-12)


def test_scheduler_can_change_any_hyperparameter():
    model, opt = _make(entry("ring/kfac/-"), momentum=0.5)
    train(opt, model, CRIT, PROBLEM, torch.float32, steps=2)
    opt.param_groups[0]["damping"] = 0.5
    opt.param_groups[0]["momentum"] = 0.9
    train(opt, model, CRIT, PROBLEM, torch.float32, steps=1)
    assert opt.core(0).config.damping == 0.5
    assert opt.core(0).config.momentum == 0.9
    opt.param_groups[0]["momentum"] = 0.0  # switched off: the buffers go
    train(opt, model, CRIT, PROBLEM, torch.float32, steps=1)
    assert opt.group_state(0).core.momentum is None
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["damping"] = -1.0
    with pytest.raises(ValueError, match="damping"):
        train(opt, model, CRIT, PROBLEM, torch.float32, steps=1)


# ------------------------------------------------------------------ state dict
def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# every configuration in float32; one per optimizer in bfloat16 (float32 state, bf16 params)
RESUME = [(i, "float32") for i in OPTIMIZERS] + [
    (entry(label), "bfloat16") for label in ("reng/kfac/double_bp", "ring/kfac/-+mc",
                                            "rkalman/woodbury/fin_diff", "rkalman/kfac/fin_diff")]


@pytest.mark.parametrize("info, dtype", RESUME, ids=[f"{i.id}-{d}" for i, d in RESUME])
def test_state_dict_resumes_bit_identically(info, dtype):
    dt = DTYPES[dtype]
    model, opt = _make(info, dt, momentum=0.5)
    train(opt, model, CRIT, PROBLEM, dt, steps=20)
    uninterrupted = flat(model)

    model, opt = _make(info, dt, momentum=0.5)
    train(opt, model, CRIT, PROBLEM, dt, steps=10)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = _make(info, dt, seed=1, momentum=0.5)  # fresh, other weights
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    core = opt2.state[next(iter(model2.parameters()))]["grng"]
    assert core.host_step == 10
    assert int(core.core.step) == 10
    train(opt2, model2, CRIT, PROBLEM, dt, steps=10, seed_base=10)
    assert torch.equal(flat(model2), uninterrupted)


def test_state_dict_of_another_shape_raises():
    ring = entry("ring/kfac/-")
    model, opt = _make(ring)
    train(opt, model, CRIT, PROBLEM, torch.float32, steps=2)
    sd = opt.state_dict()
    wide = PROBLEM.model(torch.float32, hidden=20)
    opt_wide = ring.make(wide.parameters(), wide, CRIT)
    with pytest.raises(ValueError, match="does not fit"):
        opt_wide.load_state_dict(sd)
    deeper = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3), nn.Linear(3, 3))
    opt_deep = ring.make(deeper.parameters(), deeper, CRIT)
    with pytest.raises(ValueError, match="parameters|size"):
        opt_deep.load_state_dict(sd)
    reng = gt.RENG(model.parameters(), model=model)
    with pytest.raises(ValueError, match="RING"):
        reng.load_state_dict(sd)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="hyperparameters"):
        gt.RING(model.parameters(), model=model).load_state_dict(adamw.state_dict())
    # nothing was changed by the failed loads
    train(opt_wide, wide, CRIT, PROBLEM, torch.float32, steps=1)


def test_state_dict_standard_layout():
    model, opt = _make(entry("ring/kfac/-+mc"))  # momentum
    train(opt, model, CRIT, PROBLEM, torch.float32, steps=3)
    sd = opt.state_dict()
    assert set(sd) >= {"state", "param_groups"}
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    saved = sd["state"][0]["grng"]
    assert saved["step"] == 3 and saved["layers"] == [[0, 1], [2, 3]]
    assert {"step", "momentum", "kfac"} <= set(saved["core"])


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_bad_hyperparameters_raise(info):
    model = PROBLEM.model()
    for name, value in (("lr", -1.0), ("damping", 0.0), ("momentum", 1.5),
                        ("structure", "dense"), ("fisher", "true")):
        with pytest.raises(ValueError, match=name):
            info.make(model.parameters(), model, CRIT, **{name: value})
    with pytest.raises(TypeError, match="betas"):
        info.make(model.parameters(), model, CRIT, betas=(0.9, 0.99))
    opt = info.make(model.parameters(), model, CRIT)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_a_step_without_closure_runs_only_where_nothing_reevaluates_the_loss(info):
    """Closure-free (README "Loops that call backward() themselves"): what needs the loss
    again (ĝ, sampled labels, per-example gradients) refuses, unchanged; the rest steps."""
    model, opt = _make(info)
    x, y = next(PROBLEM.batches(torch.float32))
    CRIT(model(x), y).backward()
    r = opt.core(0).requirements
    before = [p.detach().clone() for p in model.parameters()]
    if r.grad_fn or r.hvp_fn or r.fisher == "mc" or r.per_example_grads:
        with pytest.raises(TypeError, match="closure"):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    else:
        assert opt.step() is None
        assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_missing_model_or_loss_raises():
    model = PROBLEM.model()
    with pytest.raises(ValueError, match="model"):
        gt.RING(model.parameters(), structure="kfac")
    with pytest.raises(ValueError, match="loss_fn"):
        gt.RING(model.parameters(), structure="woodbury", model=model)
    with pytest.raises(ValueError, match="sample_targets"):
        gt.RING(model.parameters(), fisher="mc", model=model,
                loss_fn=gt.LossModule(lambda o, y: (o - y).abs().mean()))
    with pytest.raises(ValueError, match="reduction"):
        gt.RING(model.parameters(), structure="woodbury", model=model,
                loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    gt.RING(model.parameters(), structure="diagonal")  # needs nothing
    gt.RING(model, lr=0.1)  # the module itself


def test_state_dict_of_another_structure_is_refused():
    """torch's own load would copy the saved group's structure into this optimizer: refused,
    whether or not a step was taken, with the optimizer unchanged."""
    for steps in (0, 2):
        model, opt = _make(entry("ring/kfac/-"))
        train(opt, model, CRIT, PROBLEM, torch.float32, steps=steps)
        saved = opt.state_dict()
        other_model, other = _make(entry("ring/diagonal/-"))
        with pytest.raises(ValueError, match="structure='kfac'.*structure='diagonal'"):
            other.load_state_dict(saved)
        assert other.param_groups[0]["structure"] == "diagonal"
        assert other.group_state(0) is None


@pytest.mark.parametrize("cls, kw", [(gt.RING, {}), (gt.RENG, {}),
                                     (gt.RENG, dict(gr="finite_difference")), (gt.RKalman, {})],
                         ids=["ring", "reng", "reng-fd", "rkalman"])
def test_diagonal_without_a_model_steps_as_with_one(cls, kw):
    """structure='diagonal' needs no `model=`: its steps (closure and, for RING, closure-free)
    equal those of the same optimizer given the model (before, the first step raised
    AttributeError on the missing collector)."""
    x, y = next(PROBLEM.batches(torch.float64))
    moved = []
    for with_model, closure_free in ((False, False), (False, True), (True, False)):
        model = PROBLEM.model(torch.float64)
        opt = cls(model.parameters(), structure="diagonal", **kw,
                  **(dict(model=model) if with_model else {}))
        for _ in range(3):
            step_on(opt, model, x, y, closure_free=closure_free and cls is gt.RING)
        moved.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    start = torch.cat([p.detach().flatten() for p in PROBLEM.model(torch.float64).parameters()])
    assert not torch.equal(moved[0], start)
    for m in moved[:2]:
        torch.testing.assert_close(m, moved[2], rtol=1e-12, atol=1e-15)
