"""What a layer hook keeps of a call: whether the factored form would read its rows
(`factored_pays`), the rows themselves, copied where the loop may overwrite their input
(`kept_rows`), or reduced as they arrive (`kept_input`: a convolution's patches as a
`grng_core.InputGram`, ALGORITHMS.md §2.1), whether the call is autograd's recomputation
inside a backward (`in_backward`), and whether a backward fills a weight's gradient
(`fills_grad`)."""

from __future__ import annotations

import warnings

import array_api_compat
import torch

from grng_core.structures import factored, input_gram
from grng_core.structures.conv_gram import conv_input_gram
from grng_core.types import InputGram
from grng_core.user_frame import user_stacklevel
from grng_torch.layers import HookedLayer, conv


def factored_pays(layer: HookedLayer, x: torch.Tensor, passes: int = 1) -> bool:
    """Whether the core would precondition this call's layer in factored form (§2.1): rows it
    can branch on without a device sync (host tensors: `grng_core.concrete.branchable` for a
    torch tensor, asked of torch directly so that a torch.compile'd forward traces no
    array-api-compat helper), in float32 or wider, and fewer multiply-adds than the dense
    product for the rows of `passes` such calls (2 or 3 for a finite-difference ĝ, whose
    passes' rows are stacked)."""
    if x.device.type != "cpu" or x.dtype.itemsize < 4:
        return False  # 16-bit rows (autocast, half params) never pass the check at √eps
    return factored.cheaper(layer.d_out, layer.d_in + (layer.bias is not None),
                            passes * (x.numel() // max(x.shape[-1], 1)))


def in_backward() -> bool:
    """Inside autograd's backward (a graph task is running on this thread)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def fills_grad(node) -> bool | None:
    """Inside a backward pass: whether it runs a parameter's gradient accumulator `node`
    (``loss.backward()``: True; ``backward(inputs=...)`` without that parameter: False), or
    None inside ``torch.autograd.grad``, where torch cannot tell."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    if will_run is None:
        return None
    try:
        return bool(will_run(node))
    except RuntimeError:  # "currently running autograd.grad()"
        return None


def kept_rows(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A layer's input rows, copied where they are a view of a leaf input (the batch itself,
    token ids) that the loop may overwrite in place before the step (one buffer refilled for
    each micro-batch); autograd forbids that for the activations it saved."""
    if x.grad_fn is None and storage_of(rows) == storage_of(x) is not None:
        return rows.clone()
    return rows


#: The most bytes of a convolution's unfolded patches `kept_input` holds at once.
CHUNK_BYTES = 32 << 20


def kept_input(layer: HookedLayer, x: torch.Tensor, output: torch.Tensor,
               gram_dtype: torch.dtype | None):
    """What the hook keeps of a call's input: its rows, or their InputGram (ALGORITHMS.md
    §2.1 "Input rows reduced early") where the step asks for it (`gram_dtype`: the state dtype,
    for a convolution on a step that refreshes RENG's, RING's or NGD's factors) and the core's
    `input_gram.reducible` agrees for its rows (`HookedLayer.call_rows`).
    That is computed now, in `gram_dtype` with autocast off, over slices of the batch of at
    most `CHUNK_BYTES` of patches: a stride-1 convolution's from its padded input without
    patches (`grng_core.structures.conv_gram`), another's from one slice's patches at a time."""
    bias = layer.bias is not None
    n = layer.call_rows(x, output)
    if gram_dtype is None or layer.kind != "conv" or not input_gram.reducible(
            layer.d_out, layer.d_in + bias, n):
        return kept_rows(layer.input_rows(x.detach()), x)  # x itself: is it a leaf?
    x = x.detach()
    xp, m = array_api_compat.array_namespace(x), layer.module
    kernel, dilation, stride = conv.geometry(m)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        parts = [conv_input_gram(conv.padded_input(m, part), kernel, dilation, bias, xp,
                                 gram_dtype) if stride == (1, 1)  # no patches at all
                 else input_gram.reduce_rows(conv.input_rows(m, part), bias, xp, gram_dtype)
                 for part in conv.batch_slices(m, x, CHUNK_BYTES)]
        return input_gram.combine(parts, xp)


def joined_inputs(layer: HookedLayer, chunks: list):
    """One layer's kept inputs of several calls as one: the rows concatenated, or (where any
    call's were reduced) one InputGram, the other calls' rows reduced in its dtype."""
    if len(chunks) == 1:
        return chunks[0]
    grams = [c for c in chunks if isinstance(c, InputGram)]
    if not grams:
        return torch.cat(chunks)
    xp = array_api_compat.array_namespace(grams[0].gram)
    parts = [c if isinstance(c, InputGram) else input_gram.reduce_rows(
        c, layer.bias is not None, xp, grams[0].gram.dtype) for c in chunks]
    return input_gram.combine(parts, xp)


def zero_output_rows(chunk, d_out: int) -> torch.Tensor:
    """The output-gradient rows of a call whose output took no part in the loss: zeros, one
    row per input row of its kept input `chunk` (rows or an InputGram)."""
    if isinstance(chunk, InputGram):
        return chunk.gram.new_zeros((chunk.n, d_out))
    return chunk.new_zeros((chunk.shape[0], d_out))


def storage_of(t: torch.Tensor) -> int | None:
    """The address of a tensor's storage (None for a tensor without one: torch.func's
    wrappers under vmap or grad)."""
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


def warn_ambiguous_ids(warned: set, i: int, label: str, shape: tuple) -> None:
    """Ids of one example's shape (T,) with T equal to the batch size
    (`grng_core.structures.rows.ambiguous_ids`): warn once per layer `i` (`warned`)."""
    if i in warned:
        return
    warned.add(i)
    warnings.warn(
        f"embedding {label!r} is called on ids of shape {shape}, one example's shape, with "
        f"{shape[0]} = the batch size: they may be position ids the batch shares (arange(T), "
        "whose per-example K-FAC rows cannot be read) or per-example ids; the shapes cannot "
        "tell, and the layer stays on K-FAC. If they are positions, give them the batch's "
        "axis (arange(T)[None], as transformers does) to leave the layer to the diagonal "
        "structure", UserWarning, stacklevel=user_stacklevel())
