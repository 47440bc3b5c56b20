"""PyTorch models of the benchmark tasks (and the JAX twin of the MLP).

Every trainable matrix is an ``nn.Linear`` or ``nn.Conv2d``, so K-FAC implementations (GRNG's
``kfac`` structure, ASDL) can register them; the rest (embeddings, layer norms) falls back to a
diagonal preconditioner in GRNG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(sizes, activation: str = "tanh") -> nn.Sequential:
    """Dense network with the given layer widths, e.g. (64, 128, 64, 10)."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def small_cnn(n_classes: int = 10) -> nn.Sequential:
    """Two 3x3 convolutions and a dense head, for 1x8x8 digit images (~9k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, n_classes),
    )


def logistic_regression(d: int, n_classes: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, n_classes))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        # explicit attention (not F.scaled_dot_product_attention, whose fused CPU kernel has
        # no double backward: SophiaH and RENG's double backprop need one)
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        y = att.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Character-level causal transformer: embedding, ``layers`` pre-norm blocks, linear head.

    The forward pass returns logits of shape (B * T, vocab) so that the ordinary
    ``cross_entropy(logits, targets.reshape(-1))`` is the mean next-character loss.
    """

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4,
                 seq_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq_len, d))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos[:t]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x)).reshape(-1, self.head.out_features)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# JAX twin of `mlp` (same weights, copied from the torch model)

def torch_mlp_to_jax(model: nn.Sequential) -> list:
    """Parameters of a torch ``mlp`` as JAX ``[{"kernel": (d_in, d_out), "bias": (d_out,)},
    ...]`` (Flax layout, which ``grng_jax``'s ``layers="auto"`` registers for K-FAC)."""
    import jax.numpy as jnp

    params = []
    for m in model:
        if isinstance(m, nn.Linear):
            params.append({"kernel": jnp.asarray(m.weight.detach().numpy().T, dtype=jnp.float32),
                           "bias": jnp.asarray(m.bias.detach().numpy(), dtype=jnp.float32)})
    return params


def _dense():
    try:
        from grng_jax import dense  # plain x @ kernel + bias, tagged for GRNG's K-FAC

        return dense
    except ImportError:
        return lambda x, kernel, bias: x @ kernel + bias


def jax_mlp_apply(params, x, activation: str = "tanh"):
    """Forward pass of the JAX twin: the same function as the torch ``mlp``."""
    import jax

    act = {"tanh": jax.numpy.tanh, "relu": jax.nn.relu}[activation]
    dense = _dense()
    for i, layer in enumerate(params):
        x = dense(x, layer["kernel"], layer["bias"])
        if i < len(params) - 1:
            x = act(x)
    return x
