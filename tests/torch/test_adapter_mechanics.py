"""How the adapter talks to torch: hooks and their statistics (Linear, Conv2d, sequences),
collection only on curvature steps, closure re-evaluation, double backprop without a graph
leak, autocast, parameters without gradients, modules that are not K-FAC layers."""

from __future__ import annotations

import gc as pygc
import weakref

import grng_torch as gt
import pytest
import torch
from grng_torch import _pass_stats
from torch import nn

import grng_core as gc
from tests import cases
from tests.torch._util import Problem, closure_for, full_loss, train

PROBLEM = Problem()
CRIT = nn.CrossEntropyLoss()


def spy(opt, index=0):
    """Record the Stats and flags each core update of group `index` receives."""
    core = opt.core(index)
    calls = []
    prepare = core.prepare  # the adapter's update is prepare + finish (several groups)

    def recording(grads, state, params, stats=None, **kw):
        calls.append({"stats": stats, **{k: kw.get(k) for k in ("curvature", "inverse")}})
        return prepare(grads, state, params, stats=stats, **kw)

    object.__setattr__(core, "prepare", recording)
    return calls


# ----------------------------------------------------------------- statistics
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding="same")
        self.c2 = nn.Conv2d(4, 4, 2, padding="same", bias=False)
        self.c3 = nn.Conv2d(4, 3, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c3(h))
        return self.head(h.flatten(1))


def _first_stats(reduced: bool, monkeypatch):
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    if not reduced:  # the convolutions' rows themselves, not reduced as they arrive
        monkeypatch.setattr(_pass_stats, "gram_layers", lambda opt, gp: {})
    opt = gt.RING(model, lr=0.0, structure="kfac", rho=0.0)
    calls = spy(opt)
    opt.step(closure_for(opt, model, CRIT, x, y))
    monkeypatch.undo()
    return model, x, calls[0]["stats"].layers


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_kfac_rows_of_conv_and_linear_reproduce_the_gradient(monkeypatch):
    """sᵀa / B is the layer's weight gradient (and Σ s / B its bias gradient): the rows are
    the unfolded patches and B·dL/dz at every output position. Reduced as they arrive (the
    default on a refreshing step), a convolution's InputGram holds their aᵀa and Σa."""
    model, x, layers = _first_stats(False, monkeypatch)
    _, _, reduced = _first_stats(True, monkeypatch)
    for ls, lr in zip(layers, reduced):
        if isinstance(lr.inputs, gc.InputGram):
            torch.testing.assert_close(lr.inputs.gram, ls.inputs.T @ ls.inputs, rtol=1e-12,
                                       atol=1e-12)
            torch.testing.assert_close(lr.inputs.total, ls.inputs.sum(0), rtol=1e-12,
                                       atol=1e-12)
    assert [isinstance(lr.inputs, gc.InputGram) for lr in reduced] == [True, True, True, False]
    params = list(model.parameters())
    assert [(ls.weight, ls.bias) for ls in layers] == [(0, 1), (2, None), (3, 4), (5, 6)]
    for ls in layers:
        w = params[ls.weight]
        g = ls.output_grads.T @ ls.inputs / x.shape[0]
        assert torch.allclose(g, w.grad.reshape(w.shape[0], -1), rtol=1e-10, atol=1e-14)
        if ls.bias is not None:
            assert torch.allclose(ls.output_grads.sum(0) / x.shape[0], params[ls.bias].grad,
                                  rtol=1e-10, atol=1e-14)
    assert layers[0].inputs.shape == (6 * 25, 2 * 9)
    assert layers[2].inputs.shape == (6 * 9, 4 * 9)


def test_linear_on_sequences_uses_every_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 7))
    crit = nn.CrossEntropyLoss()
    opt = gt.RING(model, lr=0.0, rho=0.0)
    calls = spy(opt)

    def closure():
        opt.zero_grad()
        loss = crit(model(x).reshape(-1, 3), y.reshape(-1))
        loss.backward()
        return loss

    opt.step(closure)
    ls = calls[0]["stats"].layers[0]
    assert ls.inputs.shape == (35, 4) and ls.output_grads.shape == (35, 8)
    w = model[0].weight
    assert torch.allclose(ls.output_grads.T @ ls.inputs / 5, w.grad, rtol=1e-10)


def test_statistics_only_on_curvature_steps():
    model = PROBLEM.model()
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    opt = gt.RING(model, lr=0.1, fisher="mc", loss_fn=CRIT, curvature_every=3,
                  inverse_every=2, refresh_warmup=0)
    calls = spy(opt)
    counts = []
    for _ in range(7):
        forwards.clear()
        train(opt, model, CRIT, PROBLEM, torch.float32, steps=1)
        counts.append(len(forwards))
    assert [c["stats"] is not None for c in calls] == [True, False, False, True, False, False,
                                                       True]
    assert [c["curvature"] for c in calls] == [True, False, False, True, False, False, True]
    assert [c["inverse"] for c in calls] == [True, False, True, False, True, False, True]
    assert counts == [2, 1, 1, 2, 1, 1, 2]  # the sampled-label pass only when refreshing
    assert opt.collector.a == {} and opt.collector.batch.calls == []  # nothing kept


def test_kfac_group_without_layers_and_other_modules_use_the_diagonal():
    """LayerNorm parameters are not K-FAC layers (the core's diagonal); the Embedding is one
    (A diagonal, §2.1), as is the Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6), nn.LayerNorm(6), nn.Flatten(),
                          nn.Linear(18, 3))
    x, y = torch.randint(0, 20, (16, 3)), torch.randint(0, 3, (16,))
    opt = gt.RENG(model, lr=0.1, damping=1e-2, kl_clip=None)
    losses = [float(opt.step(closure_for(opt, model, CRIT, x, y)).detach()) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    entry = opt.state[model[0].weight]["grng"]
    assert entry.layers == [[0, None], [3, 4]]
    assert set(gc.codec.encode(entry.core)["diag"]) == {"1", "2"}


# ----------------------------------------------------------------- closures
# K-FAC rows of the table (tests/cases.py): closure calls per step of each estimator and scheme
CLOSURE_CASES = [(cases.get(label, bare=True), kw, n) for label, kw, n in (
    ("ring/kfac/-", {}, 1),
    ("reng/kfac/double_bp", {}, 1),
    ("reng/kfac/fin_diff", {}, 2),
    ("reng/kfac/fin_diff:central", {}, 3),
    ("reng/kfac/fin_diff", {"rho": 0.0}, 1),
)]


@pytest.mark.parametrize("case, kw, calls_per_step", CLOSURE_CASES,
                         ids=[c.id + "".join(f"-{k}={v}" for k, v in kw.items())
                              for c, kw, _ in CLOSURE_CASES])
def test_closure_is_called_where_the_algorithm_needs_a_gradient(case, kw, calls_per_step):
    model = PROBLEM.model(torch.float64)
    opt = case.torch(model, lr=0.1, **kw)
    x, y = next(PROBLEM.batches(torch.float64))
    ref = PROBLEM.model(torch.float64)
    CRIT(ref(x), y).backward()
    n = [0]

    def closure():
        n[0] += 1
        opt.zero_grad()
        loss = CRIT(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert n[0] == calls_per_step
    assert torch.is_tensor(loss)
    for p, q in zip(model.parameters(), ref.parameters()):  # .grad: the gradient at θ
        assert torch.equal(p.grad, q.grad)
        assert p.grad.grad_fn is None and not p.grad.requires_grad


def test_finite_difference_sees_the_same_dropout_mask_and_restores_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Dropout(0.5),
                          nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = next(PROBLEM.batches(torch.float64))
    masks = []
    model[2].register_forward_hook(lambda m, a, out: masks.append((out == 0).clone()))
    opt = gt.RENG(model, lr=0.1, gr="finite_difference", fd_scheme="central")
    torch.manual_seed(5)
    opt.step(closure_for(opt, model, CRIT, x, y))
    assert len(masks) == 3 and torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    assert int(model[1].num_batches_tracked) == 1  # the extra passes left no trace


def test_double_backprop_frees_the_graph():
    model = PROBLEM.model(torch.float64)
    alive = []
    model[1].register_forward_hook(lambda m, a, out: alive.append(weakref.ref(out)))
    opt = gt.RENG(model, lr=0.1, gr="double_backprop")
    train(opt, model, CRIT, PROBLEM, torch.float64, steps=2)
    pygc.collect()
    assert len(alive) == 2 and all(r() is None for r in alive)
    for p in model.parameters():
        assert p.grad.grad_fn is None


def test_closure_without_backward_raises_clearly():
    model = PROBLEM.model()
    opt = gt.RENG(model, lr=0.1)
    x, y = next(PROBLEM.batches(torch.float32))
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: CRIT(model(x), y))


def test_per_example_needs_the_loss_module_call():
    model = PROBLEM.model()
    opt = gt.RING(model, structure="woodbury", loss_fn=nn.CrossEntropyLoss())
    x, y = next(PROBLEM.batches(torch.float32))
    with pytest.raises(RuntimeError, match="loss_fn"):
        opt.step(closure_for(opt, model, CRIT, x, y))  # CRIT is another module


def test_plain_function_loss_through_opt_loss_fn():
    model = PROBLEM.model()
    opt = gt.RKalman(model, lr=0.5, loss_fn=nn.functional.cross_entropy)
    before = full_loss(model, CRIT, PROBLEM, torch.float32)
    train(opt, model, opt.loss_fn, PROBLEM, torch.float32, steps=10)
    assert full_loss(model, CRIT, PROBLEM, torch.float32) < before


def test_parameters_without_gradient_are_left_alone():
    model = PROBLEM.model()
    extra = nn.Parameter(torch.ones(3))
    opt = gt.RING([*model.parameters(), extra], model=model, lr=0.1, weight_decay=0.1)
    train(opt, model, CRIT, PROBLEM, torch.float32, steps=3)
    assert torch.equal(extra, torch.ones(3))


# -------------------------------------------------------------------- autocast
# one row of the table (tests/cases.py) per optimizer, "mc" once; this test's hyperparameters
AUTOCAST_CASES = [(cases.get(label, bare=True), kw) for label, kw in (
    ("ring/kfac/-", {}),
    ("reng/kfac/double_bp", {}),
    ("reng/woodbury/fin_diff+mc", {"damping": 0.1}),
    ("rkalman/woodbury/fin_diff", {"lr": 0.5}),
)]


@pytest.mark.parametrize("case, kw", AUTOCAST_CASES, ids=[c.id for c, _ in AUTOCAST_CASES])
@pytest.mark.parametrize("where", ["closure", "step"])
def test_autocast_bfloat16(case, kw, where):
    model = PROBLEM.model(torch.float32)
    opt = case.torch(model, loss_fn=CRIT, **{"lr": 0.2, "damping": 1e-2, **kw})
    before = full_loss(model, CRIT, PROBLEM, torch.float32)
    batches = list(PROBLEM.batches(torch.float32))
    dtypes = set()
    for k in range(12):
        x, y = batches[k % len(batches)]

        def closure(x=x, y=y):
            opt.zero_grad()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if where == "closure" \
                else torch.autocast("cpu", enabled=torch.is_autocast_enabled("cpu"))
            with ctx:
                out = model(x)
                dtypes.add(out.dtype)
                loss = CRIT(out, y)
            loss.backward()
            return loss

        if where == "step":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                opt.step(closure)
        else:
            opt.step(closure)
    assert dtypes == {torch.bfloat16}
    assert full_loss(model, CRIT, PROBLEM, torch.float32) < 0.8 * before
    state = opt.state[model[0].weight]["grng"].core
    for t in gc.state.arrays(state):
        assert not t.is_floating_point() or t.dtype == torch.float32


def test_closure_zeroing_in_place_keeps_the_gradient():
    """zero_grad(set_to_none=False) in the closure: the re-evaluations do not overwrite the
    gradient the step used (and leave in .grad)."""
    model = PROBLEM.model(torch.float64)
    ref = PROBLEM.model(torch.float64)
    x, y = next(PROBLEM.batches(torch.float64))
    CRIT(ref(x), y).backward()
    opt = gt.RENG(model, lr=0.1, gr="finite_difference", fd_scheme="central")

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = CRIT(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_group_without_regularization_next_to_double_backprop():
    """rho=0 in one group (no HVP needed there) and double backprop in the other: both get
    their gradient and move."""
    model = PROBLEM.model(torch.float64)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = gt.RENG([{"params": first}, {"params": second, "rho": 0.0}], model=model, lr=0.1)
    assert opt.core(0).requirements.hvp_fn and not opt.core(1).requirements.hvp_fn
    start = [p.detach().clone() for p in model.parameters()]
    train(opt, model, CRIT, PROBLEM, torch.float64, steps=1)
    for p, s in zip(model.parameters(), start):
        assert p.grad is not None and not torch.equal(p, s)


def test_hooks_go_with_the_optimizer():
    model = PROBLEM.model()
    opt = gt.RING(model, lr=0.1)
    assert model[0]._forward_hooks and model._forward_pre_hooks
    del opt
    pygc.collect()
    assert not model[0]._forward_hooks and not model._forward_pre_hooks


class _Attention(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        q, k, v = self.qkv(self.emb(idx)).chunk(3, dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y).reshape(-1, self.head.out_features)


def test_double_backprop_through_scaled_dot_product_attention():
    """The fused attention kernels have no double backward: the HVP closure runs on the
    math kernel."""
    torch.manual_seed(0)
    model = _Attention()
    x, y = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (24,))
    opt = gt.RENG(model, lr=0.1, damping=0.1, gr="double_backprop")
    losses = [float(opt.step(closure_for(opt, model, CRIT, x, y)).detach()) for _ in range(8)]
    assert losses[-1] < losses[0]
    assert opt.state[model.emb.weight]["grng"].layers == [[0, None], [1, 2], [3, 4]]


@pytest.mark.parametrize("name", ["RING", "RENG", "RKalman"])
def test_sparse_gradients_are_refused_before_anything_changes(name):
    """nn.Embedding(sparse=True): a clear error naming the parameter and the fix (it crashed
    inside torch's sparse division or `where`), the parameters unchanged."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(20, 8, sparse=True), nn.Linear(8, 3)

        def forward(self, i):
            return self.fc(self.emb(i).mean(1))

    torch.manual_seed(0)
    model = Bag()
    ids, y = torch.randint(0, 20, (16, 4)), torch.randint(0, 3, (16,))
    opt = getattr(gt, name)(model.parameters(), model=model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameters \['emb.weight'\].*"
                                           r"sparse=False"):
        opt.step(closure_for(opt, model, CRIT, ids, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
