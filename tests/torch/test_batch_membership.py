"""Which model calls are part of the batch (`Call.used`, `Collector.used_calls`): a call
without gradients, or one whose outputs (the model's and the hooked layers') no gradient
reached, is no part of it, and neither its examples (E, ALGORITHMS.md §2.1) nor its rows count.
Each case is checked in float64 against the same run without the extra call, or with the batch
in one call; each failed before (a review's scripts, session 13)."""

from __future__ import annotations

import grng_torch as gt
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.torch._util import take_step


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _data(steps, b=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 6, dtype=torch.float64, generator=g),
             torch.randint(0, 3, (b,), generator=g)) for _ in range(steps)]


def _flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def _close(a, b):
    assert (a - b).norm() <= 1e-12 * a.norm(), ((a - b).norm() / a.norm()).item()


X_EVAL = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))


def test_a_micro_batch_only_an_unhooked_head_uses_still_counts():
    """RING owns head a, AdamW head b; micro-batch 2's loss uses head b only. Its examples
    count (its rows of head a are zero): as the batch in one call."""
    class TwoTask(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    def run(split):
        torch.manual_seed(0)
        model = TwoTask().double()
        ring = gt.RING(model.a.parameters(), model=model, lr=0.1, damping=0.1)
        adam = torch.optim.AdamW(model.b.parameters(), lr=1e-2)
        for (xa, ya), (xb, yb) in zip(_data(3), _data(3, seed=4)):
            def closure(xa=xa, ya=ya, xb=xb, yb=yb):
                ring.zero_grad()
                adam.zero_grad()
                if split:
                    (F.cross_entropy(model(xa)["a"], ya) / 2).backward()
                    (F.cross_entropy(model(xb)["b"], yb) / 2).backward()
                else:
                    out = model(torch.cat([xa, xb]))
                    ((F.cross_entropy(out["a"][:8], ya)
                      + F.cross_entropy(out["b"][8:], yb)) / 2).backward()
            ring.step(closure)
            adam.step()
        return _flat(model.a.parameters())

    _close(run(False), run(True))


@pytest.mark.parametrize("mixed", [False, True])
def test_a_metric_call_in_a_closure_with_the_sampled_fisher(mixed):
    """fisher="mc" re-runs the closure's calls: not the metric's (detached output), and the
    rows of the re-run belong to the call re-run (with mixed groups they were filed under the
    metric call and dropped: the layer went to the diagonal)."""
    def run(metric):
        model = _mlp()
        groups = ([{"params": model[0].parameters(), "fisher": "empirical"},
                   {"params": model[2].parameters(), "fisher": "mc"}] if mixed
                  else [{"params": model.parameters(), "fisher": "mc"}])
        opt = gt.RING(groups, model=model, lr=0.1, damping=0.1, loss_fn=nn.CrossEntropyLoss())
        for s, (x, y) in enumerate(_data(3)):
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = opt.loss_fn(model(x), y)
                loss.backward()
                if metric:
                    model(X_EVAL).detach()
                return loss
            torch.manual_seed(100 + s)  # the same sampled labels in both runs
            opt.step(closure)
        assert all(e.structure == "kfac" for e in opt.describe().entries)
        return _flat(model.parameters())

    _close(run(False), run(True))


def test_a_call_without_gradients_in_the_closure_does_not_count():
    def run(extra):
        model = _mlp()
        opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1)
        for x, y in _data(4):
            def closure(x=x, y=y):
                opt.zero_grad()
                if extra:
                    with torch.no_grad():
                        model(X_EVAL)  # a target computed by the model, say
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        return _flat(model.parameters())

    _close(run(False), run(True))


@pytest.mark.parametrize("where", ["between_forward_and_backward", "after_step"])
def test_closure_free_evaluation_with_gradients(where):
    """`out = model(x); model(x_val); loss.backward(); opt.step()` (a second forward before the
    backward dropped the first's rows, and its stale hooks wrote into the second's; a 5-row
    evaluation crashed), and a 128-row evaluation after the step, which decided the warm-up of
    the 16-row batch."""
    x_eval = torch.randn(128, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def run(evaluate):
        model = _mlp()
        opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1)
        for s, (x, y) in enumerate(_data(5, b=16)):
            if evaluate and where == "after_step" and s > 0:
                model(x_eval)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if evaluate and where == "between_forward_and_backward":
                model(x_eval[:5])
            loss.backward()
            opt.step()
        return _flat(model.parameters())

    _close(run(False), run(True))


def test_two_calls_in_one_loss_closure_free_equal_the_closure():
    """A siamese loss (model(x1) − model(x2))²: two calls before one backward."""
    def run(closure_free):
        model = _mlp()
        opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1)
        for (x1, _), (x2, _) in zip(_data(4), _data(4, seed=5)):
            def closure(x1=x1, x2=x2):
                opt.zero_grad()
                loss = (model(x1) - model(x2)).pow(2).mean()
                loss.backward()
                return loss
            take_step(opt, closure, closure_free)
        return _flat(model.parameters())

    _close(run(False), run(True))


def test_reentrant_checkpointing_with_an_evaluation_before_the_backward():
    """The evaluation's hooked outputs never get a gradient; the recomputation inside the
    backward of the training call was taken for a checkpointed call's repeat and skipped."""
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(6, 12), nn.Linear(12, 3)

        def forward(self, x):
            if self.training:
                h = checkpoint(lambda t: torch.tanh(self.body(t)), x, use_reentrant=True)
            else:
                h = torch.tanh(self.body(x))
            return self.head(h)

    def run(evaluate):
        torch.manual_seed(0)
        model = Checkpointed().double()
        opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1)
        for x, y in _data(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x.requires_grad_()), y)
            if evaluate:
                model.eval()
                model(X_EVAL)
                model.train()
            loss.backward()
            opt.step()
        return _flat(model.parameters())

    _close(run(False), run(True))


class WithLogVar(nn.Module):
    """Returns a trainable parameter beside the logits (uncertainty-weighted losses)."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(6, 3)  # registered first, used by no loss
        self.body, self.head = nn.Linear(6, 12), nn.Linear(12, 3)
        self.log_var = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))), self.log_var


def _run_log_var(evaluate, closure_free, parts=1, whole_checkpoint=False):
    torch.manual_seed(0)
    model = WithLogVar().double()
    opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1)
    call = (lambda x: checkpoint(model, x, use_reentrant=False)) if whole_checkpoint else model
    for x, y in _data(4):
        def closure(x=x, y=y):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                logits, log_var = call(xs)
                loss = (F.cross_entropy(logits, ys) * torch.exp(-log_var) + log_var) / parts
                loss.backward()
            if evaluate:
                model(X_EVAL)  # evaluation with gradients: log_var's hook would fire
        take_step(opt, closure, closure_free)
    return _flat(model.parameters())


@pytest.mark.parametrize("closure_free", [False, True])
def test_a_returned_parameter_does_not_make_an_evaluation_part_of_the_batch(closure_free):
    """Only outputs computed by the call are watched: a parameter's hook fires on every
    backward through it (the evaluation counted 5 examples, and the hooks piled up)."""
    _close(_run_log_var(False, closure_free), _run_log_var(True, closure_free))


@pytest.mark.parametrize("closure_free", [False, True])
def test_checkpointing_the_whole_model_in_micro_batches(closure_free):
    """The recomputation inside the backward calls the model again; closure-free, it was
    taken for a new iteration and the rows were dropped (a crash, or E of the last micro-batch);
    the unused head registered first no longer decides whether the gradients were cleared."""
    ref = _run_log_var(False, False, parts=2)
    _close(ref, _run_log_var(False, closure_free, parts=2, whole_checkpoint=True))


def test_a_constant_first_argument_does_not_make_micro_batches_repeats():
    """model(ctx, x) with one ctx tensor for every micro-batch: calls are told apart by all
    their tensor arguments (with the first alone, 4 + 4 counted E = 4)."""
    class WithContext(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

        def forward(self, ctx, x):
            return self.net(x + ctx)

    ctx4 = torch.randn(4, 6, dtype=torch.float64)  # the first tensor: it holds the batch axis
    ctx8 = torch.cat([ctx4, ctx4])

    def run(parts):
        torch.manual_seed(0)
        model = WithContext().double()
        opt = gt.RING(model.parameters(), model=model, lr=0.1, damping=0.1)
        for x, y in _data(3):
            def closure(x=x, y=y):
                opt.zero_grad()
                for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                    ctx = ctx8 if parts == 1 else ctx4  # the same tensor in every micro-batch
                    (F.cross_entropy(model(ctx, xs), ys) / parts).backward()
            opt.step(closure)
        return _flat(model.parameters())

    _close(run(1), run(2))


def test_a_buffer_refilled_in_place_is_refused_where_the_model_is_run_again():
    """fisher="mc" re-runs each call on its inputs: a buffer refilled for every micro-batch
    holds the last one by then (silently wrong before); refused before anything changes."""
    model = _mlp()
    opt = gt.RING(model.parameters(), model=model, fisher="mc", loss_fn=nn.CrossEntropyLoss())
    (x, y), = _data(1)
    buf = torch.empty(4, 6, dtype=torch.float64)
    before = _flat(model.parameters())

    def closure():
        opt.zero_grad()
        for k in range(2):
            buf.copy_(x[4 * k:4 * k + 4])
            (opt.loss_fn(model(buf), y[4 * k:4 * k + 4]) / 2).backward()

    with pytest.raises(RuntimeError, match="modified in place after its call"):
        opt.step(closure)
    assert torch.equal(_flat(model.parameters()), before)
