"""RING under Hugging Face's `Trainer`, which calls `backward()` itself and then `step()`
without a closure: gradient accumulation 2 × 4 equals one batch of 8 (float32, dropout off,
the data in order), and evaluation during training changes nothing. BERT's forward ignores
`num_items_in_batch`, so the Trainer sums its micro-batch losses unless
`model.accepts_loss_kwargs = False` (README "Gradient accumulation")."""

from __future__ import annotations

import grng_torch as gt
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

T, V, STEPS = 16, 64, 6


def _model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0))
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=T, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    model.accepts_loss_kwargs = False  # the Trainer then averages the micro-batch losses
    return model


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, T), generator=g)
    labels = ids.clone() if kind == "gpt2" else ids[:, 0] % 3

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    return Data()


class InOrder(transformers.Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _train(tmp_path, kind, accumulate, evaluate=False):
    model = _model(kind)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = gt.RING(model.parameters(), model=model)
    kw = dict(eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=5) \
        if evaluate else {}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8 // accumulate,
        gradient_accumulation_steps=accumulate, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0, **kw)
    InOrder(model=model, args=args, train_dataset=_data(kind, 8 * STEPS, 1),
            eval_dataset=_data(kind, 7, 2) if evaluate else None,
            optimizers=(opt, None)).train()
    assert int(opt.group_state(0).core.skipped) == 0
    return start, torch.cat([p.detach().flatten() for p in model.parameters()]), opt


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_trainer_accumulation_equals_the_combined_batch(kind, tmp_path):
    start, one, _ = _train(tmp_path, kind, 1)
    _, two, opt = _train(tmp_path, kind, 2)
    moved = (one - start).norm()
    assert moved > 1e-2
    assert (two - one).norm() <= 1e-4 * moved  # float32 (measured: 8e-7 GPT-2, 1.5e-6 BERT)
    if kind == "gpt2":  # position ids (1, T): shared by the batch (README)
        assert [e.structure for e in opt.describe().entries
                if e.name == "transformer.wpe.weight"] == ["diagonal"]


def test_trainer_evaluation_during_training_changes_nothing(tmp_path):
    _, plain, _ = _train(tmp_path, "gpt2", 2)
    _, evaluated, _ = _train(tmp_path, "gpt2", 2, evaluate=True)
    assert torch.equal(plain, evaluated)
