"""`F.linear` calls of functional layers (nn.MultiheadAttention's packed projections), seen
through a torch-function mode while a collection is open: the module applies its weight itself,
so no module hook sees the call."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class LinearCalls(TorchFunctionMode):
    """Sees `F.linear` calls whose weight is a functional layer's (nn.MultiheadAttention's
    packed in-projection and out-projection) and hands (input, output) to its layer hook."""

    def __init__(self, collector: Any):
        super().__init__()
        self.collector = collector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        if func is F.linear:
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            i = self.collector.functional.get(id(weight))
            if i is not None:
                x = args[0] if args else (kwargs or {}).get("input")
                self.collector._hooks[i](None, (x,), out)
            elif (base := getattr(weight, "_base", None)) is not None:
                j = self.collector.functional.get(id(base))
                if j is not None:  # cross-attention: rows of the packed weight, apart
                    self.collector.sliced.add(j)
        return out


    def _attention(self, func, args, kwargs):
        """F.multi_head_attention_forward is itself dispatched as one torch function, so its
        body runs without this mode: run the body with the mode active instead, its own
        dispatch check (`F.has_torch_function`, its only one) bypassed for this call."""
        functional: Any = F
        saved = functional.has_torch_function
        functional.has_torch_function = lambda *_: False
        try:
            with self:
                return func(*args, **kwargs)
        finally:
            functional.has_torch_function = saved
