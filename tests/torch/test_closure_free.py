"""`step()` without a closure (the loop calls backward() itself, as Hugging Face's Trainer,
Lightning and accelerate do): RING uses the gradients and the K-FAC rows of the backward
passes since the previous step. Reference: the same run with the closure, step for step
(warm-up, scheduled refreshes, an evaluation pass under no_grad between steps, gradient
clipping). RENG and R-Kalman, which re-evaluate the loss, refuse it with the reason."""

import grng_torch
import pytest
import torch
from torch import nn

from tests.torch._util import TwoHeads, step_on


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 6, dtype=torch.float64, generator=g),
             torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kw", [{}, {"form": "gauss_newton"}, {"structure": "diagonal"}])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("evaluation", ["no_grad", "with_grad"])
def test_closure_free_ring_equals_the_closure_run(kw, clip, evaluation):
    """Reference: the closure run with nothing else in it. The closure-free run evaluates
    between backward() and step(), and with "with_grad" does so with gradients enabled (its
    calls reach no gradient: `Collector.unused_calls`); a third run's closure also calls the
    model for a metric whose output it detaches. Before the calls were recognised, those
    examples counted in the batch (E) and their inputs in A."""
    batches = _batches(25)  # the 20-step warm-up and refreshes at 20
    x_eval = torch.randn(4, 6, dtype=torch.float64)
    runs = []
    for how in ("closure", "closure_free", "closure_with_metric")[:2 + (evaluation != "no_grad")]:
        model = _model()
        opt = grng_torch.RING(model.parameters(), model=model, **kw)
        for x, y in batches:
            def backward(opt=opt, model=model, x=x, y=y, metric=how == "closure_with_metric"):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                if metric:
                    model(x_eval).detach()
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                return loss
            if how == "closure_free":
                backward()
                with torch.set_grad_enabled(evaluation == "with_grad"):
                    model(x_eval)  # an evaluation pass: not a training batch
                assert opt.step() is None
            else:
                opt.step(backward)
        assert int(opt.group_state(0).core.skipped) == 0
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,kw", [("RENG", {}), ("RKalman", {}),
                                     ("RING", {"fisher": "mc",
                                               "loss_fn": nn.CrossEntropyLoss()})])
def test_what_needs_the_loss_again_refuses_a_step_without_a_closure(name, kw):
    model = _model()
    opt = getattr(grng_torch, name)(model.parameters(), model=model, **kw)
    assert not opt.collector.armed  # its hooks keep nothing between steps
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="without a closure cannot give"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.group_state(0) is None


def test_no_backward_before_a_closure_free_step_is_an_error():
    model = _model()
    opt = grng_torch.RING(model.parameters(), model=model)
    with pytest.raises(RuntimeError, match=r"call loss\.backward\(\) before"):
        opt.step()


def test_hugging_face_trainer_trains_with_ring():
    """Trainer calls optimizer.step() after its own backward (with its gradient clipping)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (64, 8), generator=g)
    labels = (ids[:, 0] > 25).long()

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    opt = grng_torch.RING(model.parameters(), model=model)
    args = transformers.TrainingArguments(output_dir="/tmp/grng-hf-trainer", max_steps=30,
                                          per_device_train_batch_size=16, logging_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(),
                                   optimizers=(opt, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert int(opt.group_state(0).core.skipped) == 0
    assert opt.describe().kfac_share > 0.9


def _run(batches, closure_free, events=None, **kw):
    """RING over `batches`; `events`: {step index: callable(model, opt)} run before it."""
    model = _model()
    opt = grng_torch.RING(model.parameters(), model=model, **kw)
    for t, (x, y) in enumerate(batches):
        if events and t in events:
            events[t](model, opt)
        step_on(opt, model, x, y, closure_free)
    return model, opt


def test_a_rollback_by_load_state_dict_between_closure_free_steps():
    """The hooks re-arm for the loaded step (a rollback from a scheduled step into the
    warm-up): the run equals the closure run with the same rollback."""
    saved = {}

    def save(model, opt):
        saved["opt"] = opt.state_dict()

    def load(model, opt):
        opt.load_state_dict(saved["opt"])
    batches = _batches(30)
    runs = [_run(batches, cf, {19: save, 25: load}) for cf in (False, True)]
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_param_group_added_mid_run_is_collected_closure_free():
    """A group added after construction (layers unfrozen during fine-tuning) gets K-FAC as
    with a closure."""
    def unfreeze(model, opt):
        model[2].weight.requires_grad_(True)
        model[2].bias.requires_grad_(True)
        opt.add_param_group({"params": list(model[2].parameters())})

    def build(closure_free):
        model = _model()
        model[2].weight.requires_grad_(False)
        model[2].bias.requires_grad_(False)
        opt = grng_torch.RING(list(model[0].parameters()), model=model)
        for t, (x, y) in enumerate(_batches(8)):
            if t == 3:
                unfreeze(model, opt)
            step_on(opt, model, x, y, closure_free)
        return model, opt
    (m1, o1), (m2, o2) = build(False), build(True)
    assert o2.describe().kfac_share == o1.describe().kfac_share == 1.0
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("where", ["start", "end"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_step_that_never_came_leaves_no_rows_behind(set_to_none, where):
    """An iteration whose step is skipped (a GradScaler overflow, a NaN guard) and whose
    gradients are then cleared, at the start of the next iteration or at the end of this one,
    also in place (set_to_none=False, which left the rows behind: 7.9e-3): the next step uses
    its own batch's rows only, as the closure run that never saw the skipped batch."""
    batches = _batches(8)
    ref, _ = _run(batches[:3] + batches[4:], closure_free=False)
    model = _model()
    opt = grng_torch.RING(model.parameters(), model=model)
    for t, (x, y) in enumerate(batches):
        if where == "start":
            opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        if t != 3:  # the loop skips this step
            opt.step()
        if where == "end":
            opt.zero_grad(set_to_none=set_to_none)
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _scaled_run(scaler, n=24, **kw):
    """RING closure-free over n batches (the warm-up and a refresh) with `scaler` (None: no
    scaler) around backward and step, as an fp16 training loop writes it."""
    model = _model()
    opt = grng_torch.RING(model.parameters(), model=model, **kw)
    for x, y in _batches(n):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert int(opt.group_state(0).core.skipped) == 0
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kw", [{}, {"form": "gauss_newton"}])
@pytest.mark.parametrize("enabled", [True, False])
def test_a_grad_scaler_step_equals_the_unscaled_run(kw, enabled):
    """Under an enabled torch.amp.GradScaler (scale 2^10, growing to 2^11 after 4 steps) the
    hooks' rows carry the loss scale that GradScaler removed from the gradients: the step
    divides them by `get_scale()` and equals the run without a scaler (before, the S factor
    was scale² too large and RING barely moved, silently; then it was refused). A disabled
    scaler (GradScaler(enabled=use_amp) with AMP off) is no scaler."""
    ref = _scaled_run(None, **kw)
    got = _scaled_run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=4,
                                           enabled=enabled), **kw)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    start = [q.detach() for q in _model().parameters()]
    assert max(float((a - p).abs().max()) for a, p in zip(ref, start)) > 1e-2


@pytest.mark.parametrize("zero_at_end", [False, True])
def test_a_grad_scaler_with_accumulation_and_skipped_steps_equals_the_unscaled_run(zero_at_end):
    """Two micro-batches a step under a growing scale, and two iterations whose gradient
    GradScaler finds non-finite (it skips the step and halves the scale): equal to the
    unscaled run without those two iterations (their rows are dropped with their gradients)."""
    bad, n = {7, 21}, 24
    batches = _batches(2 * n)

    def run(scaler):
        model = _model()
        opt = grng_torch.RING(model.parameters(), model=model)
        for it in range(n):
            if scaler is None and it in bad:
                continue
            if not zero_at_end:
                opt.zero_grad()
            for x, y in batches[2 * it:2 * it + 2]:
                loss = nn.functional.cross_entropy(model(x), y) / 2
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
            else:
                if it in bad:
                    model[0].weight.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
            if zero_at_end:
                opt.zero_grad()
        assert int(opt.group_state(0).core.skipped) == 0
        return [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    for a, b in zip(run(None), run(scaler)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert scaler.get_scale() != 2.0 ** 10


def test_accelerates_optimizer_wrapper_with_a_grad_scaler_equals_the_unscaled_run():
    """accelerate's AcceleratedOptimizer steps through its scaler's `step`: found there."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    runs = []
    for use in (False, True):
        model = _model()
        opt = grng_torch.RING(model.parameters(), model=model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        wrapped = AcceleratedOptimizer(opt, device_placement=False,
                                       scaler=scaler if use else None)
        for x, y in _batches(24):
            wrapped.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            (scaler.scale(loss) if use else loss).backward()
            wrapped.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [grng_torch.RENG, grng_torch.RKalman])
def test_an_enabled_grad_scaler_refuses_what_needs_a_closure(cls):
    """RENG and R-Kalman re-evaluate the loss, which needs a closure, which GradScaler does not
    pass: refused naming GradScaler and the way out, before anything changes."""
    model = _model()
    opt = cls(model.parameters(), model=model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batches(1)[0]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="GradScaler does not pass"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.group_state(0) is None


def test_a_layer_absent_on_one_replica_is_an_error_under_a_collective():
    """Ranks must refresh the same layers (their collectives pair up): with a collective a
    layer without rows is an error that says so and how to keep such a layer (a diagonal
    param group), before anything changes (an identity collective, one process)."""
    import grng_core as gc

    torch.manual_seed(0)
    model = TwoHeads(6, 8, 3).double()
    ident = gc.Collective(mean=lambda v: v, gather=lambda v: v, replicas=1)
    opt = grng_torch.RING(model.parameters(), model=model, collective=ident)
    x, y = _batches(1)[0]
    step_on(opt, model, x, y)

    def one_head():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x, both=False), y)
        loss.backward()
        return loss
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="'head2' took no part .* torch.distributed.*"
                                           "structure='diagonal'"):
        opt.step(one_head)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.group_state(0).host_step == 1


def test_a_second_step_after_one_backward_says_what_is_missing():
    """The first step used the backward's rows; a second step() on the same gradients, which
    refreshes the factors (warm-up), has none: the error names the missing backward, not a
    closure the loop never passed (before: "the closure must run the model's forward")."""
    model = _model()
    opt = grng_torch.RING(model.parameters(), model=model)
    x, y = _batches(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"call loss.backward\(\) before each step\(\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
