"""A model zoo as users bring it: models from the libraries people train with, built from
configs with random weights, and small tasks from Python's own text and scikit-learn.

Each `ZooModel` holds the model, a batch maker, the loss the closure computes from the
model's output, and which modules K-FAC must cover (by module path suffix).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.models_real import ResidualBlock  # conv-BN-ReLU-conv-BN + identity


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    batch: Callable[[int], tuple]  # step -> (inputs, targets)
    loss: Callable  # (model output, targets) -> scalar
    kfac: tuple[str, ...]  # K-FAC layer-name suffixes that must be present
    diagonal: tuple[str, ...] = ()  # parameter names reported on the diagonal
    probe: str = ""  # a shared-weight layer (applied at T > 1 positions per example)

    def step(self, opt, k: int):
        """One `opt.step` on batch k with the usual closure; returns what step returns (the
        loss tensor for GRNG and torch.optim)."""
        x, y = self.batch(k)

        def closure():
            opt.zero_grad()
            loss = self.loss(self.model(x), y)
            loss.backward()
            return loss

        return opt.step(closure)


def _text_tokens(vocab: int) -> torch.Tensor:
    """Characters of CPython's `inspect` module source, folded into `vocab` ids."""
    text = inspect.getsource(inspect)[:20000]
    return torch.tensor([ord(c) % vocab for c in text])


def _lm_batches(vocab: int, B: int, T: int):
    tokens = _text_tokens(vocab)

    def batch(step: int):
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(tokens) - T - 1, (B,), generator=g)
        x = torch.stack([tokens[s:s + T] for s in starts])
        y = torch.stack([tokens[s + 1:s + T + 1] for s in starts])
        return x, y

    return batch


def gpt2(vocab: int = 48, B: int = 8, T: int = 16, seed: int = 0) -> ZooModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)  # the initialisation; the batches do not depend on it
    cfg = GPT2Config(vocab_size=vocab, n_positions=T, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0,
                     resid_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    return ZooModel("gpt2", model, _lm_batches(vocab, B, T),
                    lambda out, y: F.cross_entropy(out.logits.reshape(-1, vocab), y.reshape(-1)),
                    kfac=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "wpe"),
                    diagonal=("transformer.wte.weight",),  # tied with lm_head
                    probe="transformer.h.0.attn.c_attn")


def _seq_classes(vocab: int, B: int, T: int):
    """Label: whether token 1 occurs more often than token 2 in a random sequence."""

    def batch(step: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, vocab, (B, T), generator=g)
        y = ((x == 1).sum(1) > (x == 2).sum(1)).long()
        return x, y

    return batch


def bert(vocab: int = 16, B: int = 8, T: int = 12, seed: int = 0) -> ZooModel:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)  # the initialisation; the batches do not depend on it
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=T,
                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    return ZooModel("bert", model, _seq_classes(vocab, B, T),
                    lambda out, y: F.cross_entropy(out.logits, y),
                    kfac=("attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense", "intermediate.dense", "output.dense",
                          "pooler.dense", "classifier", "word_embeddings",
                          "position_embeddings", "token_type_embeddings"),
                    probe="bert.encoder.layer.0.attention.self.query")


class ResNet(nn.Module):
    """ResNet-style CNN with BatchNorm for 8x8 digits."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.block1 = ResidualBlock(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.block2 = ResidualBlock(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.block1(F.relu(self.bn(self.stem(x))))
        x = self.block2(F.relu(self.down(x)))
        return self.fc(x.mean((2, 3)))


def _digits(B: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)

    def batch(step: int):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, len(y), (B,), generator=g)
        return x[idx], y[idx]

    return batch


def resnet(B: int = 32, seed: int = 0) -> ZooModel:
    torch.manual_seed(seed)  # the initialisation; the batches do not depend on it
    return ZooModel("resnet_bn", ResNet(), _digits(B), F.cross_entropy,
                    kfac=("stem", "conv1", "conv2", "down", "fc"), probe="block1.conv1")


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder over token embeddings, mean-pooled, a Linear head."""

    def __init__(self, vocab: int = 16, d: int = 32, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def encoder(B: int = 8, T: int = 12, seed: int = 0) -> ZooModel:
    torch.manual_seed(seed)  # the initialisation; the batches do not depend on it
    return ZooModel("transformer_encoder", EncoderClassifier(), _seq_classes(16, B, T),
                    F.cross_entropy, kfac=("linear1", "linear2", "head", "embed",
                                           "self_attn.in_proj", "self_attn.out_proj"),
                    probe="encoder.layers.0.linear1")


ZOO = {"gpt2": gpt2, "bert": bert, "resnet_bn": resnet, "transformer_encoder": encoder}
