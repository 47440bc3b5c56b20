"""The benchmark's models of the kinds users bring (issue #15's tasks): a tiny GPT-2 from
``transformers`` as a character LM, and a ResNet-style CNN with BatchNorm for 16x16 digits.

Both return logits the suite's cross-entropy reads directly: (B * T, vocab) for the LM,
(B, classes) for the CNN.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class GPT2Char(nn.Module):
    """``transformers.GPT2LMHeadModel`` (random weights from a config, tied embeddings, dropout
    off so that every pass of a step sees the same function) as a char LM: ``forward(idx)``
    returns the logits as (B * T, vocab)."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4,
                 seq_len: int = 64):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=d, n_layer=layers,
                         n_head=heads, bos_token_id=0, eos_token_id=0, attn_pdrop=0.0,
                         embd_pdrop=0.0, resid_pdrop=0.0)
        self.vocab = vocab
        self.gpt2 = GPT2LMHeadModel(cfg)

    def forward(self, idx):
        return self.gpt2(idx).logits.reshape(-1, self.vocab)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetBN(nn.Module):
    """ResNet-style CNN with BatchNorm for 1x16x16 images: a stem, two residual stages (the
    second at half resolution and twice the channels), global average pooling, a linear head."""

    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.block1 = ResidualBlock(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(2 * c)
        self.block2 = ResidualBlock(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.block1(F.relu(self.bn(self.stem(x))))
        x = self.block2(F.relu(self.bn_down(self.down(x))))
        return self.fc(x.mean((2, 3)))
