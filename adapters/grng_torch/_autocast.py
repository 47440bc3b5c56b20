"""The autocast state of a model call, re-entered for the optimizer's own passes, and turned
off for the core's math (which runs in its own dtypes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def autocast_state() -> tuple:
    out = []
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        out.append((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
    return tuple(out)


@contextlib.contextmanager
def autocast_as(state: tuple) -> Iterator[None]:
    """Re-enter the autocast state recorded by `_autocast_state`."""
    with contextlib.ExitStack() as stack:
        for dev, enabled, dtype in state:
            stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
        yield


def autocast_off() -> contextlib.AbstractContextManager:
    """Autocast disabled on every device (the core's math runs in its own dtypes); nothing to
    do where it is off already."""
    state = autocast_state()
    if not any(enabled for _, enabled, _ in state):
        return contextlib.nullcontext()
    return autocast_as(tuple((dev, False, dtype) for dev, _, dtype in state))
