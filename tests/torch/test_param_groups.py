"""Param groups with the same hyperparameters change no step, as in torch.optim: ‖g‖² (RING's
c_t, the finite-difference radius), the trust region's ⟨d, ĝ⟩ and the regularised gradient's
H·g are the whole model's (ALGORITHMS.md §1, §3.2, §3 tail; `grng_core.Whole`). Reference:
the same optimizer with one group, float64. Before the fix two groups moved RING's step by
107% of its norm at the defaults (Hugging Face's Trainer always makes two groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.torch._util import OPTIMIZERS, Problem, flat, ids, train

LOSS = nn.CrossEntropyLoss()
# every optimizer and structure, the library's trust region (kl_clip) on and off
ENTRIES = [i for i in OPTIMIZERS if i.structure in ("kfac", "diagonal")]


def _groups(model, split: bool):
    if not split:
        return list(model.parameters())
    first, last = model[0], model[2]
    return [{"params": list(first.parameters())}, {"params": list(last.parameters())}]


def _run(info, split: bool, **extra):
    problem = Problem()
    model = problem.model(torch.float64)
    opt = info.make(_groups(model, split), model, LOSS, **extra)
    train(opt, model, LOSS, problem, torch.float64, steps=4)
    return flat(model)


@pytest.mark.parametrize("kl_clip", [1e-3, None], ids=["kl_clip", "no_kl_clip"])
@pytest.mark.parametrize("info", ENTRIES, ids=ids(ENTRIES))
def test_two_groups_equal_one(info, kl_clip):
    start = flat(Problem().model(torch.float64))
    one, two = _run(info, False, kl_clip=kl_clip), _run(info, True, kl_clip=kl_clip)
    moved = (one - start).norm()
    assert moved > 1e-6  # the steps did something
    torch.testing.assert_close(two, one, rtol=0, atol=1e-10 * float(moved))


def test_the_trust_region_sums_over_groups_with_their_learning_rates():
    """κ against Σ_i η_i²⟨d_i, ĝ_i⟩ (kfac-pytorch's sum over layers with each one's lr): with
    ρ = 0 and no momentum, d_i is the group's own NGD direction, so the clipped step is
    ν·η_i·d_i with one ν = √(κ / Σ_i η_i²⟨d_i, g_i⟩), read here from unclipped steps."""
    import grng_torch

    problem = Problem()
    x, y = next(problem.batches(torch.float64))

    def step(kl_clip):
        model = problem.model(torch.float64)
        before = [p.detach().clone() for p in model.parameters()]
        groups = _groups(model, True)
        groups[1]["lr"] = 0.05
        opt = grng_torch.RING(groups, lr=0.5, rho=0.0, damping=1e-2, kl_clip=kl_clip,
                              model=model, loss_fn=LOSS)

        def closure():
            opt.zero_grad()
            loss = LOSS(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        grads = [p.grad.detach().clone() for p in model.parameters()]
        return [p.detach() - b for p, b in zip(model.parameters(), before)], grads

    free, grads = step(None)  # u_i = −η_i d_i
    lrs = [0.5, 0.5, 0.05, 0.05]
    quad = sum(float(lr * (-(u * g).sum())) for lr, u, g in zip(lrs, free, grads))
    kappa = 1e-4
    nu = min(1.0, (kappa / quad) ** 0.5)
    assert nu < 0.5  # clipped
    clipped, _ = step(kappa)
    for c, f in zip(clipped, free):
        torch.testing.assert_close(c, nu * f, rtol=1e-9, atol=1e-14)


def _step_once(groups_kw, make_groups, x, y, nan_group=None, **kw):
    import grng_torch

    problem = Problem()
    model = problem.model(torch.float64)
    groups = [{**grp, **g} for grp, g in zip(make_groups(model), groups_kw)]
    opt = grng_torch.RENG(groups, model=model, loss_fn=LOSS, **kw)
    before = flat(model)

    def closure():
        opt.zero_grad()
        loss = LOSS(model(x), y)
        loss.backward()
        if nan_group is not None:
            opt.param_groups[nan_group]["params"][0].grad[0, 0] = float("nan")
        return loss
    opt.step(closure)
    return flat(model) - before, opt


def test_a_finite_difference_group_before_a_double_backprop_group():
    """The shifted passes move every group; they did so in place, which broke the other
    group's double-backprop graph ("modified by an inplace operation"): now they bypass the
    version counters and restore the values exactly before the product is taken. Reference:
    the double_backprop group's step equals the all-double_backprop run's (the same H·g)."""
    x, y = next(Problem().batches(torch.float64))
    kw = dict(lr=0.2, damping=1e-2, structure="diagonal", kl_clip=None)
    mixed, _ = _step_once([dict(gr="finite_difference"), dict(gr="double_backprop")],
                          lambda m: _groups(m, True), x, y, **kw)
    exact, _ = _step_once([dict(gr="double_backprop"), dict(gr="double_backprop")],
                          lambda m: _groups(m, True), x, y, **kw)
    n_first = sum(p.numel() for p in Problem().model()[0].parameters())
    torch.testing.assert_close(mixed[n_first:], exact[n_first:], rtol=1e-12, atol=1e-15)
    assert (mixed[:n_first] - exact[:n_first]).norm() < 1e-2 * exact[:n_first].norm()


@pytest.mark.parametrize("kl_clip", [1e-3, None], ids=["kl_clip", "no_kl_clip"])
def test_a_nonfinite_gradient_in_one_group_skips_the_step_of_every_group(kl_clip):
    """As one group would: nothing moves, each group counts the skip (before, with the trust
    region off, the finite group moved)."""
    x, y = next(Problem().batches(torch.float64))
    with pytest.warns(RuntimeWarning, match="skipped"):
        moved, opt = _step_once([{}, {}], lambda m: _groups(m, True), x, y, nan_group=1,
                                lr=0.2, damping=1e-2, kl_clip=kl_clip)
    assert torch.count_nonzero(torch.nan_to_num(moved, nan=1.0)) == 0
    assert [int(opt.group_state(i).core.skipped) for i in range(2)] == [1, 1]


def _closure_calls(make, split: bool, steps: int = 3, **kw) -> list[int]:
    """Closure calls of each step (the first pass and the shifted ones)."""
    problem = Problem()
    model = problem.model(torch.float64)
    opt = make(_groups(model, split), model=model, loss_fn=LOSS, **kw)
    x, y = next(problem.batches(torch.float64))
    calls = []

    def closure():
        calls[-1] += 1
        opt.zero_grad()
        loss = LOSS(model(x), y)
        loss.backward()
        return loss
    for _ in range(steps):
        calls.append(0)
        opt.step(closure)
    return calls


@pytest.mark.parametrize("algo, kw", [
    ("RKalman", {}),  # the defaults: forward differences, the passes' K-FAC rows
    ("RENG", {"gr": "finite_difference", "fd_scheme": "central"}),
    ("RKalman", {"structure": "diagonal"}),
], ids=["rkalman", "reng_central", "rkalman_diagonal"])
def test_groups_share_the_shifted_passes(algo, kw):
    """The finite-difference passes move the whole model (`Oracle.along_fn`), so groups whose
    passes have equal c = r/‖g‖ run them once: the closure calls of one group. (The first
    step of K-FAC groups runs each group's pass: a group's layers are found in its own.)"""
    import grng_torch

    make = getattr(grng_torch, algo)
    one, two = _closure_calls(make, False, **kw), _closure_calls(make, True, **kw)
    assert one[1:] == two[1:] and one[-1] == (3 if "fd_scheme" in kw else 2)
    shifted = one[0] - 1
    assert two[0] == 1 + (2 * shifted if kw.get("structure", "kfac") == "kfac" else shifted)


def test_groups_with_different_radii_run_their_own_passes():
    """Unequal fd_radius: different c, so each group runs its own shifted pass."""
    import grng_torch

    def make(groups, **kw):
        groups[1]["fd_radius"] = 1e-2
        return grng_torch.RKalman(groups, **kw)
    assert _closure_calls(make, True)[1:] == [3, 3]


def test_a_split_of_weights_and_biases_warns_once_and_whole_layers_do_not():
    """The weight-decay recipe's groups (weights / biases) put every bias on the diagonal:
    said at construction (model= gives the layers), once; groups of whole layers say nothing."""
    import warnings

    import grng_torch

    model = Problem().model(torch.float64)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    with pytest.warns(UserWarning, match=r"biases of 2 K-FAC layers .* another param group"):
        opt = grng_torch.RING([{"params": weights, "weight_decay": 0.01},
                               {"params": biases, "weight_decay": 0.0}], model=model,
                              loss_fn=LOSS)
    problem = Problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(opt, model, LOSS, problem, torch.float64, steps=2)  # no second warning
        whole = problem.model(torch.float64)
        grng_torch.RING(_groups(whole, True), model=whole, loss_fn=LOSS)


@pytest.mark.parametrize("case", ["diagonal", "weights_diagonal", "bitfit"])
def test_no_split_warning_where_no_kfac_block_is_split(case):
    """A review's false positives: structures without K-FAC, the weights' group on the
    diagonal, and BitFit (frozen weights in no group): nothing to keep together."""
    import warnings

    import grng_torch

    model = Problem().model(torch.float64)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    kw = {"structure": "diagonal"} if case == "diagonal" else {}
    groups = [{"params": weights}, {"params": biases}]
    if case == "weights_diagonal":
        groups[0]["structure"] = "diagonal"
    if case == "bitfit":
        for w in weights:
            w.requires_grad_(False)
        groups = [{"params": biases}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = grng_torch.RING(groups, model=model, loss_fn=LOSS, **kw)
        train(opt, model, LOSS, Problem(), torch.float64, steps=1)
