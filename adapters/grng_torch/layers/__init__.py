"""The layer types the torch adapter gives K-FAC (ALGORITHMS.md §2.1), one helper per type, and
the registration log of every module with parameters (kfac-pytorch's `layers/` pattern).

- `linear`: `nn.Linear` (any leading dims) and transformers' `Conv1D` (weight stored (in, out));
- `conv`: `nn.Conv1d` / `nn.Conv2d` (groups = 1, zero padding), unfolded patches as rows;
- `conv_transpose`: `nn.ConvTranspose1d` / `2d` (groups = 1), one row per input position;
- `embedding`: `nn.Embedding`, token ids as rows (A diagonal: token frequencies);
- `registry.find_layers(model)`: the hooked layers and a `LayerRecord` per parameterised
  module saying which structure its weights get and why (tied, unsupported type, ...).
"""

from grng_torch.layers.base import HookedLayer
from grng_torch.layers.registry import LayerRecord, Registry, find_layers

__all__ = ["HookedLayer", "LayerRecord", "Registry", "find_layers"]
