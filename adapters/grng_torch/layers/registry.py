"""Which modules get K-FAC, and a record of every parameterised module saying why or why not.

Each weight is preconditioned from the statistics of every use or not at all: a parameter
shared by two modules (tied embeddings, GPT-2's `lm_head` and `wte`) stays on the diagonal
structure, reported as tied (its gradient holds both uses; one use's factors would be wrong).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn
from torch.nn.utils import parametrize

from grng_torch.layers import conv, conv_transpose, embedding, linear
from grng_torch.layers.base import HookedLayer


class LayerRecord(NamedTuple):
    """One module that owns parameters: its path, type, parameter names, "kfac" or "diagonal",
    and the reason when diagonal."""

    path: str
    type: str
    params: tuple[str, ...]
    structure: str
    reason: str | None = None


class Registry(NamedTuple):
    layers: list[HookedLayer]
    records: list[LayerRecord]


COMPUTED = ("K-FAC would precondition the computed weight, not the parameters it is computed "
            "from")


def _computed_weight(m: Any) -> str | None:
    """Why a layer whose weight is computed from other parameters is not hooked, or None."""
    if parametrize.is_parametrized(m):
        which = ", ".join(sorted(m.parametrizations.keys()))
        return (f"{type(m).__name__}: its {which} is computed by torch.nn.utils.parametrize "
                f"(weight_norm, spectral_norm, orthogonal, ...): {COMPUTED}")
    if isinstance(m, parametrize.ParametrizationList):
        return ("the trainable originals of a tensor computed by torch.nn.utils.parametrize: "
                f"{COMPUTED}")
    hooks = {type(h).__name__ for h in m._forward_pre_hooks.values()}
    if hooks & {"WeightNorm", "SpectralNorm"}:  # the older torch.nn.utils functions
        return (f"{type(m).__name__}: its weight is computed from other parameters by a hook "
                f"({', '.join(sorted(hooks & {'WeightNorm', 'SpectralNorm'}))}): {COMPUTED}")
    return None


def _hook_of(m: Any, name: str) -> tuple[HookedLayer | None, str | None]:
    """(hooked layer, None) for a supported module, else (None, reason)."""
    computed = _computed_weight(m)
    if computed is not None:
        return None, computed
    if linear.is_linear(m):
        return HookedLayer(name, m, "linear", m.weight, m.bias, False, linear.rows,
                           linear.rows), None
    if linear.is_hf_conv1d(m):
        return HookedLayer(name, m, "linear", m.weight, getattr(m, "bias", None), True,
                           linear.rows, linear.rows), None
    if isinstance(m, conv_transpose.TYPES):
        why = conv_transpose.supported(m)
        if why is None:  # the bias, added after the windows overlap, stays diagonal
            return HookedLayer(name, m, "conv_transpose", m.weight, None, True,
                               conv_transpose.input_rows, conv_transpose.output_rows,
                               in_axes=1), None
        return None, why
    if isinstance(m, nn.modules.conv._ConvNd):
        why = conv.supported(m)
        if why is None:
            return HookedLayer(name, m, "conv", m.weight, m.bias, False, conv.input_rows,
                               conv.output_rows), None
        return None, why
    if isinstance(m, nn.MultiheadAttention):
        if m._qkv_same_embed_dim and m.in_proj_weight is not None:
            return HookedLayer(f"{name}.in_proj" if name else "in_proj", m, "linear",
                               m.in_proj_weight, m.in_proj_bias, False, linear.rows,
                               linear.rows, functional=True), None
        return None, ("nn.MultiheadAttention with separate q/k/v projection weights (kdim or "
                      "vdim differ from embed_dim): not hooked")
    if isinstance(m, nn.Embedding):
        why = embedding.supported(m)
        if why is None:
            return HookedLayer(name, m, "embedding", m.weight, None, True,
                               embedding.input_rows, embedding.output_rows,
                               a_diagonal=True), None
        return None, why
    if isinstance(m, nn.EmbeddingBag):
        return None, "no K-FAC helper for nn.EmbeddingBag (pooled rows)"
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return None, "normalisation scale and shift (1-d)"
    own = list(m.parameters(recurse=False))
    if "norm" in type(m).__name__.lower() and own and all(p.ndim <= 1 for p in own):
        return None, f"normalisation scale (1-d, {type(m).__name__})"  # RMSNorm, T5LayerNorm
    return None, f"no K-FAC helper for {type(m).__name__}"


def owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """id(parameter) -> {id(module): path} of every module that holds it directly (a module
    called at several places is one owner: its hooks see every use)."""
    owners: dict[int, dict[int, str]] = {}
    for path, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), {})[id(m)] = path
    return owners


def find_layers(model: nn.Module) -> Registry:
    """The K-FAC layers of `model` and the registration log of all its modules."""
    held = owners(model)
    inside_mha = {f"{path}.{child}" if path else child
                  for path, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for child, _ in m.named_modules() if child}
    layers, records = [], []
    for path, m in model.named_modules():
        own = [(n, p) for n, p in m._parameters.items() if p is not None]
        if not own or (isinstance(m, nn.modules.lazy.LazyModuleMixin)
                       and m.has_uninitialized_params()):  # type: ignore[misc]
            continue
        names = tuple(f"{path}.{n}" if path else n for n, _ in own)
        layer, why = _hook_of(m, path)
        if path in inside_mha:  # out_proj: applied by the attention with F.linear
            layer, why = (HookedLayer(path, m, "linear", m.weight, m.bias, False, linear.rows,
                                      linear.rows, functional=True), None) \
                if linear.is_linear(m) else (None, "inside nn.MultiheadAttention: not hooked")
        tied = sorted({o for _, p in own for k, o in held[id(p)].items() if k != id(m)})
        if layer is not None and tied:
            layer, why = None, f"tied: its weight is also used by {tied} (K-FAC from one use " \
                               "would be wrong)"
        if layer is None:
            records.append(LayerRecord(path, type(m).__name__, names, "diagonal", why))
        else:
            layers.append(layer)
            records.append(LayerRecord(path, type(m).__name__, names, "kfac"))
    return Registry(layers, records)
