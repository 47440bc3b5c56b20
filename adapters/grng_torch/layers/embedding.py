"""`nn.Embedding`: one-hot inputs, so A is the diagonal of token frequencies (ALGORITHMS.md §2.1
"Embeddings"): the rows handed to the core are the token ids, the output gradients one row per
token; the weight is stored (vocab, dim), i.e. transposed."""

from __future__ import annotations

import torch
from torch import nn


def supported(m: nn.Embedding) -> str | None:
    """None when the embedding gets K-FAC, else why not."""
    if type(m).forward is not nn.Embedding.forward:
        return "its class overrides forward"
    if m.sparse:
        return "sparse=True (sparse gradients)"
    if m.scale_grad_by_freq:
        return "scale_grad_by_freq=True (the gradient is not the rows' product)"
    if m.max_norm is not None:
        return "max_norm (renormalises the weight in the forward)"
    return None


def input_rows(_module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return ids.reshape(-1)


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1, g.shape[-1])
