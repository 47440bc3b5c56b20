"""A sequence-first model read batch-first: the model's batch size is read from axis
`batch_axis` (0 by default) of its first tensor argument; a model that takes (T, B, ...) (the
layout of torch's RNNs, attention and transformer layers with batch_first=False) then has the
sequence length read as the batch size, which scales every K-FAC statistic by T/B (ALGORITHMS.md
§2.1: an example's output-gradient row is B times its share of the mean loss) and nothing else
tells. Those modules state their layout: when one is called in a collected model call with the
call's batch size on its axis 0 and another size on its axis 1 (its batch axis), warn once.
The hooks go after one look, and at the latest after the optimizer's first step (`stop`)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from grng_core.user_frame import user_stacklevel

#: the modules with a `batch_first` flag (a transformer layer passes its own to its attention)
SEQUENCE_FIRST = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)


def watch(collector) -> list:
    """Forward pre-hooks on the model's sequence-first modules (none where `batch_axis` is not
    0: the user chose the axis); their handles, removed with the collector's."""
    if collector.batch_axis != 0:
        return []
    found = [(path, m) for path, m in collector.root.named_modules()
             if isinstance(m, SEQUENCE_FIRST) and not getattr(m, "batch_first", True)]
    handles: list = []

    def hook_for(path: str, module: nn.Module):
        def pre(_module, args):
            x = args[0] if args else None
            calls = collector.batch.calls
            if not calls or calls[-1].size is None or not isinstance(x, torch.Tensor) \
                    or x.dim() != 3:
                return None  # no collected call, an unbatched or packed sequence: no evidence
            size = calls[-1].size
            if x.shape[0] == size and x.shape[1] != size:
                warnings.warn(
                    f"the model's batch size was read as {size} from axis 0 of its first "
                    f"tensor argument, but {path or 'the model'} ({type(module).__name__}, "
                    f"batch_first=False) was called on shape {tuple(x.shape)}: {size} on its "
                    f"sequence axis and {x.shape[1]} on its batch axis. If the model takes its "
                    "input sequence-first (T, B, ...), pass batch_axis=1 to the optimizer: "
                    "the K-FAC statistics are scaled by the batch size, and with the sequence "
                    "length in its place they are T/B times too large", UserWarning,
                    stacklevel=user_stacklevel())
            while handles:  # one look is enough (either way), then no cost on later calls
                handles.pop().remove()
            return None
        return pre

    # bookkeeping of the first step only: eager under torch.compile (no graph break, no
    # recompile when the hooks go)
    handles.extend(m.register_forward_pre_hook(torch.compiler.disable(hook_for(path, m)))
                   for path, m in found)
    return list(handles)


def stop(collector) -> None:
    """Remove the hooks that are still there (a model whose sequence-first modules saw no
    3-d tensor argument: a PackedSequence, keyword arguments)."""
    while collector.sequence_watch:
        collector.sequence_watch.pop().remove()
