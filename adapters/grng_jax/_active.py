"""The collector of the collecting pass being traced (`grng_jax._tags.Collector`), if any:
a context variable read by every tagged layer and layer hook."""

from __future__ import annotations

import contextvars
from typing import Any

ACTIVE: contextvars.ContextVar = contextvars.ContextVar("grng_jax_collector", default=None)


def active() -> Any:
    """The active collector, or None outside the optimizer's collecting passes."""
    return ACTIVE.get()
