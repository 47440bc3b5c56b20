"""Hooks on the call methods of flax.nnx and equinox layers (they have no interception API
like ``flax.linen.intercept_methods``). A hooked method runs unchanged and, only while a
`Collector` is active (`grng_jax._tags`), hands the layer, its input and its output to the
hook, which returns the output to use (tagged). Installed once per class, on first use; the
method's behaviour outside the optimizer's collecting passes is untouched."""

from __future__ import annotations

import functools
from collections.abc import Callable

from grng_jax._active import active

_HOOKED = "__grng_jax_hook__"


def hook_method(cls, name: str, hook: Callable, with_call: bool = False) -> None:
    """Wrap ``cls.<name>``: ``hook(collector, module, first_arg, output) -> output``
    (`with_call`: ``hook(collector, module, args, kwargs, output)``, the call's arguments)."""
    orig = cls.__dict__.get(name)
    if orig is None or getattr(orig, _HOOKED, False):
        return

    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        col = active()
        if col is None or not args:
            return out
        if with_call:
            return hook(col, self, args, kwargs, out)
        return hook(col, self, args[0], out)

    setattr(method, _HOOKED, True)
    setattr(cls, name, method)
