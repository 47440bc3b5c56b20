"""`step()` without a closure (the loop calls backward() itself, as Hugging Face's Trainer,
Lightning and accelerate do): RING uses the gradients and the K-FAC rows of the backward
passes since the previous step. Reference: the same run with the closure, step for step
(warm-up, scheduled refreshes, an evaluation pass under no_grad between steps, gradient
clipping). RENG and R-Kalman, which re-evaluate the loss, refuse it with the reason."""

import grng_torch
import pytest
import torch
from torch import nn


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 6, dtype=torch.float64, generator=g),
             torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kw", [{}, {"form": "gauss_newton"}, {"structure": "diagonal"}])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_closure_free_ring_equals_the_closure_run(kw, clip):
    batches = _batches(25)  # the 20-step warm-up and refreshes at 20
    runs = []
    for closure_free in (False, True):
        model = _model()
        opt = grng_torch.RING(model.parameters(), model=model, **kw)
        for x, y in batches:
            def backward(opt=opt, model=model, x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                return loss
            if closure_free:
                backward()
                with torch.no_grad():  # an evaluation pass: not a training batch
                    model(torch.randn(4, 6, dtype=torch.float64))
                assert opt.step() is None
            else:
                opt.step(backward)
        assert int(opt.group_state(0).core.skipped) == 0
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,kw", [("RENG", {}), ("RKalman", {}),
                                     ("RING", {"fisher": "mc",
                                               "loss_fn": nn.CrossEntropyLoss()})])
def test_what_needs_the_loss_again_refuses_a_step_without_a_closure(name, kw):
    model = _model()
    opt = getattr(grng_torch, name)(model.parameters(), model=model, **kw)
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
