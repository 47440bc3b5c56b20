"""Module hooks that collect what the core's curvature structures need from a torch model.

- K-FAC rows of every layer `grng_torch.layers` hooks: the layer inputs a (n, d_in), without
  the ones column, and the output gradients s (n, d_out) with rows E · dL/dz, E the examples
  of every model call in the closure (so a closure that accumulates micro-batches, each loss
  scaled by its share of the batch, gives the combined batch's rows; §2.1). A convolution's
  inputs are its unfolded patches, one row per (example, output position).
- Every call of the model in the closure (`_model_calls.Call`: positional and keyword
  arguments, batch size, autocast state, and the loss module's input shape and targets), so
  the optimizer can re-run the model functionally (per-example gradients through
  `torch.func`, the "mc" Fisher's sampled-label pass) on each micro-batch. A call without
  gradients, or one whose outputs (the model's and the hooked layers') no gradient reached,
  took no part in the loss and is left out (`used_calls`).

Nothing is collected unless the optimizer opened a collection (`Collector.collect`, inside
its closure) or armed the hooks for a step without a closure (`Collector.arm`: passes that
build a graph, from the first forward after the gradients were cleared), so otherwise the
hooks cost one attribute check on ordinary forward passes (evaluation, other code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from grng_torch import _sequence_first as sequence_first
from grng_torch._autocast import autocast_state
from grng_torch._layer_rows import (
    factored_pays,
    in_backward,
    kept_input,
    warn_ambiguous_ids,
)
from grng_torch._layer_warmup import layer_warms, layer_warms_now
from grng_torch._linear_calls import LinearCalls
from grng_torch._model_calls import (
    PENDING,
    UNKNOWN_BATCH,
    Batch,
    Call,
    batch_of,
    bind_pending,
    note_once,
    unwrap,
)
from grng_torch._param_pass import ParamPass
from grng_torch.layers import find_layers


class Collector:
    """Hooks on one model (and optionally its loss module); inert until `collect` opens
    or `arm` arms them."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module | None = None,
                 batch_axis: int = 0):
        self.model = model
        self.batch_axis = batch_axis  # the examples' axis of the model call's first tensor
        self.root = unwrap(model)
        self.registry = find_layers(self.root)
        self.layers = self.registry.layers
        self.mode: str | None = None  # None | "backward" | "outputs"
        self.active: set[int] = set()
        self.capture = False
        self.batch = Batch()
        # the loss scale of the backward the rows come from: an enabled GradScaler's on its
        # closure-free step (`_closure_free.check_closure_free`), else 1; set on every step
        self.loss_scale = 1.0
        self.a: dict[int, list] = {}
        # per layer, per forward call k of it: (output-gradient rows, factor), factor None
        # meaning "times E" (the closure's backward) or a number (explicit passes)
        self.s: dict[int, dict[int, tuple]] = {}
        self.z: dict[int, list] = {}
        self.call_of: dict[int, list[int]] = {}  # per layer, each input chunk's model call
        self.replaying: int | None = None  # the call an extra pass runs again ("mc")
        self.depth, self.pending = 0, False  # model calls running; layer calls outside one
        self.generation, self.zeroed = 0, False  # bumped when the rows are dropped: older
        # hooks keep nothing; zeroed: the optimizer's zero_grad ran since the last model call
        # layers collected only for the factored form -> the passes whose rows it stacks
        self.rows_only: dict[int, int] = {}
        # warm-up-only refresh: layer -> group config; per call, `warms` / `warms_now`
        self.warmup_only: dict[int, Any] = {}
        self.warming: dict[int, dict[int, bool]] = {}
        self.grams: dict[int, Any] = {}  # layer -> dtype its rows are reduced in (`collect`)
        self.no_warmup: set[int] = set()  # layers seen to skip the warm-up (describe())
        # layers called on an input shared by the batch (`shared_over_batch`) -> why: never
        # collected again, so they are absent from every step (diagonal from the first)
        self.broadcast: dict[int, str] = {}
        self.broadcast_warned: set[int] = set()  # found shared after their first step
        self.ambiguous: set[int] = set()  # warned: ids (T,) with T = B (`Call.ambiguous`)
        self.oversized: dict[int, str] = {}  # layers over max_factor_dim: why (describe)
        self.batch_noted = False  # warned: the batch size not from the first tensor argument
        self.keep_outputs = True  # the model outputs' autograd nodes (`_summed_loss`)
        self.frozen: set[int] = set()  # layers left out at the first step: weight frozen
        self.thawed: set[int] = set()  # of those, warned as unfrozen since (`_describe`)
        self.empty: set[int] = set()  # layers called on an input without rows (`_describe`)
        self.sliced: set[int] = set()  # functional layers applied by slices (`_linear_calls`)
        # between closure-free steps the hooks stay open for the next step's needs (`arm`):
        # then only the passes that build a graph count (not evaluation under no_grad)
        self.armed = False
        self.passes = ParamPass(self.layers)  # which backward passes give rows
        self.hooked: dict[int, set[int]] = {}  # layer -> its calls whose output has a grad hook
        self._handles = self._root_hooks()
        self._hooks = [self._layer_hook(i) for i in range(len(self.layers))]
        for i, L in enumerate(self.layers):
            if not L.functional:
                self._handles.append(L.module.register_forward_hook(self._hooks[i]))
        # layers whose module applies the weight with F.linear itself (MultiheadAttention)
        self.functional = {id(L.weight): i for i, L in enumerate(self.layers) if L.functional}
        if loss_fn is not None:
            self._handles.append(loss_fn.register_forward_pre_hook(self._loss_hook,
                                                                   with_kwargs=True))
        self.sequence_watch = sequence_first.watch(self)  # (T, B) read batch-first: warned
        self._handles += self.sequence_watch

    def _root_hooks(self) -> list:
        """The model call's hooks: its arguments and outputs, and (eagerly, `_call_index`)
        how many model calls are running."""
        root = self.root
        return [root.register_forward_pre_hook(self._root_hook, with_kwargs=True),
                root.register_forward_hook(self._root_out_hook, with_kwargs=True),
                root.register_forward_pre_hook(torch.compiler.disable(self._enter)),
                root.register_forward_hook(torch.compiler.disable(self._leave), always_call=True)]

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # ------------------------------------------------------------------ hooks
    def _root_hook(self, module, args, kwargs):
        if not self.capture or (self.armed and not torch.is_grad_enabled()):
            return None
        self._drop_if_cleared()
        self.zeroed = False
        first, size, example, note = batch_of(args, kwargs, self.batch_axis)
        note_once(self, note)
        self.batch.add(Call(tuple(args), dict(kwargs), size, example, autocast_state()), first)
        if self.pending:
            bind_pending(self, len(self.batch.calls) - 1)
        return None

    def _drop_if_cleared(self) -> None:
        """The calls kept had their backward and the gradients were cleared since: an
        iteration whose step never came, or a probe's backward in the closure (an FGSM step's
        x.grad), not a second forward before the backward. Their rows are dropped."""
        if self.s and not in_backward() and self._grads_cleared():
            self.a, self.s, self.z, self.batch = {}, {}, {}, Batch()
            self.hooked, self.call_of, self.warming = {}, {}, {}
            self.generation += 1

    def _enter(self, module, args):
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth = max(self.depth - 1, 0)

    def _root_out_hook(self, module, args, kwargs, output):
        """Watch the model call's outputs: a gradient reaching one makes the call part of the
        batch (`Call.used`), whichever layers the optimizer hooks."""
        if (not self.capture or self.mode != "backward" or not torch.is_grad_enabled()
                or not self.batch.calls or in_backward()):
            return None
        c = len(self.batch.calls) - 1
        outs = (output,) if isinstance(output, torch.Tensor) else \
            torch.utils._pytree.tree_leaves(output)
        for t in outs:
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:  # not a parameter
                t.register_hook(self._reached_hook(c))
                self.batch.calls[c].watched = True
                if self.keep_outputs:  # until the first closure's loss was looked at
                    self.batch.calls[c].outputs += (t.grad_fn,)
        return None

    def _reached_hook(self, c: int):
        generation = self.generation

        def hook(grad):
            if (generation == self.generation and c < len(self.batch.calls)
                    and self.passes.reaches(self.root.parameters())):
                self.batch.calls[c].reached = True
            return None

        return hook

    def _call_index(self) -> int:
        """The model call a layer call belongs to: the one an extra pass runs again; inside a
        backward (a checkpoint's recomputation), the latest it has reached; else the latest."""
        if self.replaying is not None:
            return self.replaying
        n = len(self.batch.calls)
        if in_backward():
            return next((c for c in range(n - 1, -1, -1) if self.batch.calls[c].reached), n - 1)
        if self.depth == 0:  # outside a model call: the next one's input (`bind_pending`)
            self.pending = True
            return PENDING
        return n - 1

    def _loss_hook(self, module, args, kwargs):
        if self.capture and self.batch.calls:
            self.batch.calls[-1].take_loss_call(args, kwargs)
        return None

    def _layer_hook(self, i: int):
        layer = self.layers[i]

        def hook(module, inputs, output):
            if self.mode is None or i not in self.active or not inputs:
                return None
            if not torch.is_grad_enabled():
                return None  # its output takes no part in a gradient (evaluation, no_grad)
            if in_backward() and self._awaiting(i):
                return None  # activation checkpointing's recomputation of a collected call
            x = inputs[0]
            if x.numel() == 0:  # no rows (an expert no token reached): its factors are kept
                return self.empty.add(i)
            if self.shared_over_batch(i, x):
                return None  # per-example rows cannot be read: the layer stays off K-FAC
            if i in self.rows_only and not factored_pays(layer, x, self.rows_only[i]):
                return None  # rows the core would not use: keep nothing
            if self.depth == 0 and self.capture:  # a call outside the model's (inputs_embeds)
                self._drop_if_cleared()
            if i in self.warmup_only and not self.warms(i, x, output):
                return None  # the layer skips the warm-up: the core refreshes it not now
            chunks = self.a.setdefault(i, [])
            chunks.append(kept_input(layer, x, output, self.grams.get(i)))
            c = self._call_index()
            self.call_of.setdefault(i, []).append(c)
            if self.mode == "outputs":
                self.z.setdefault(i, []).append((len(chunks) - 1, output))
            elif output.requires_grad:
                output.register_hook(self._grad_hook(i, len(chunks) - 1))
                self.hooked.setdefault(i, set()).add(len(chunks) - 1)
                if 0 <= c < len(self.batch.calls):
                    self.batch.calls[c].watched = True
            return None

        # bookkeeping only: under torch.compile it runs eagerly instead of being traced once
        # per layer and per state of the collector (which hit Dynamo's recompile limit)
        return torch.compiler.disable(hook)

    def shared_over_batch(self, i: int, x: torch.Tensor) -> bool:
        """Whether layer i is called on an input the model call's examples share (GPT-2's and
        BERT's position ids, (1, T): `grng_core.structures.rows.shared_by_batch`); then its
        rows are dropped and it is never collected again (its reason in `broadcast`)."""
        if i in self.broadcast:
            return True
        if self.layers[i].functional:
            return False  # MultiheadAttention's projections: inputs laid out (T, B, E) inside
        c = self._call_index()
        if not 0 <= c < len(self.batch.calls):
            return False
        call = self.batch.calls[c]
        why = call.shares(x, self.batch_axis, self.layers[i].a_diagonal)
        if why is None:
            if self.layers[i].a_diagonal and call.ambiguous(x, self.batch_axis):
                warn_ambiguous_ids(self.ambiguous, i, self.layers[i].label, tuple(x.shape))
            return False
        self.broadcast[i] = why
        for kept in (self.a, self.s, self.z, self.hooked, self.call_of):
            kept.pop(i, None)
        return True

    warms, warms_now = layer_warms, layer_warms_now  # `_layer_warmup`

    def _grad_hook(self, i: int, k: int):
        generation = self.generation

        def hook(grad):
            if (self.mode == "backward" and i in self.active and i not in self.broadcast
                    and generation == self.generation and self.passes.counts((i,))):
                self._add(i, k, grad.detach(), None)
            return None

        return hook

    # -------------------------------------------------------------- sessions
    @contextlib.contextmanager
    def collect(self, mode: str | None, active=(), capture: bool = False,
                rows_only=None, warmup_only=None, grams=None) -> Iterator[None]:
        """Collect K-FAC rows of the layers numbered in `active` ("backward": s from the
        backward pass through tensor hooks; "outputs": keep the outputs z for an explicit
        autograd.grad), and the model calls / loss targets when `capture`. `rows_only`
        (layer -> passes): layers whose rows only the factored form reads, kept where it pays
        (`factored_pays`). `warmup_only` (layer -> config, kept until `clear`): layers that
        may skip this step's refresh. `grams` (layer -> state dtype, kept until `clear`):
        layers whose rows are reduced as they arrive (`kept_input`)."""
        if warmup_only is not None:
            self.warmup_only = dict(warmup_only)
        if grams is not None:
            self.grams = dict(grams)
        old = (self.mode, self.active, self.capture, self.rows_only)
        self.mode, self.active, self.capture = mode, set(active), capture
        self.rows_only = dict(rows_only or {})
        calls = mode is not None and any(i in self.active for i in self.functional.values())
        try:
            with LinearCalls(self) if calls else contextlib.nullcontext():
                yield
        finally:
            self.mode, self.active, self.capture, self.rows_only = old

    def arm(self, active, rows_only=None, warmup_only=None, grams=None) -> None:
        """Collect from the user's own forward and backward passes until the next step (a
        `step()` without a closure): as `collect("backward", active, capture=True, ...)`, left
        open; passes without gradients (evaluation) are not collected."""
        self.clear()
        self.mode, self.active, self.capture = "backward", set(active), True
        self.rows_only = dict(rows_only or {})
        self.warmup_only, self.grams = dict(warmup_only or {}), dict(grams or {})
        self.armed = True

    def _awaiting(self, i: int) -> bool:
        """Layer i has a call of this pass whose output gradient has not arrived yet: a
        forward of it now, inside the backward, recomputes that call (non-reentrant
        activation checkpointing) and is not another batch."""
        if self.mode == "outputs":
            return bool(self.z.get(i))
        pending = self.hooked.get(i, set()) - set(self.s.get(i, {}))
        # of a call this backward has reached: not a forward that is no part of it (an
        # evaluation with gradients), whose hooks never fire
        calls, n = self.call_of.get(i, ()), len(self.batch.calls)
        return any(not 0 <= calls[k] < n or self.batch.calls[calls[k]].reached for k in pending)

    def _grads_cleared(self) -> bool:
        """The optimizer's `zero_grad` ran since the last model call, or a trainable weight the
        kept calls' backward reached has no `.grad` (cleared since): those calls belong to an
        iteration whose step never came (a skipped step: GradScaler overflow, a NaN guard)."""
        w = next((L.weight for i in self.s if (L := self.layers[i]).weight.requires_grad), None)
        return self.zeroed or (w is not None and w.grad is None)

    def disarm(self) -> None:
        if self.armed:
            self.mode, self.active, self.capture, self.rows_only = None, set(), False, {}
            self.armed = False
            self.clear()

    @contextlib.contextmanager
    def side_pass(self) -> Iterator[None]:
        """A pass whose rows and model calls are kept apart from the step's own (restored
        after it): the finite-difference oracle's shifted pass (§1, §2.1)."""
        saved = (self.a, self.s, self.z, self.batch, self.warmup_only, self.warming, self.hooked,
                 self.call_of)
        self._reset()
        try:
            yield
        finally:
            (self.a, self.s, self.z, self.batch, self.warmup_only, self.warming,
             self.hooked, self.call_of) = saved

    def _reset(self) -> None:
        """Drop the rows and model calls kept (`clear`: before and after each step)."""
        self.a, self.s, self.z, self.hooked, self.call_of = {}, {}, {}, {}, {}
        self.warmup_only, self.warming, self.grams = {}, {}, {}
        self.batch, self.zeroed = Batch(), False
        self.generation += 1

    clear = _reset

    def used_calls(self) -> list[tuple[int, Call]]:
        """(index, call) of the model calls that are part of the batch (`Call.used`): not an
        evaluation with gradients enabled between `backward()` and a closure-free `step()`,
        nor a forward whose output was detached for a metric. The others' examples (E) and
        rows do not count."""
        return self.batch.used()

    def _used_chunks(self, i: int) -> list[int]:
        """Layer i's input chunks from used calls (those of calls an extra pass ran again
        belong to theirs; any other index is kept)."""
        calls, n = self.call_of.get(i, ()), len(self.batch.calls)
        return [k for k in range(len(self.a.get(i, ())))
                if not 0 <= calls[k] < n or self.batch.calls[calls[k]].used]

    def has_rows(self, i: int) -> bool:
        if i in self.broadcast or not self.a.get(i) or not self.s.get(i):
            return False
        return bool(self._used_chunks(i))

    def _add(self, i: int, k: int, grad: torch.Tensor, factor) -> None:
        rows = self.layers[i].output_rows(grad)
        got = self.s.setdefault(i, {})
        if k in got:  # a second backward through the same forward: gradients add up
            rows = rows + got[k][0]
        got[k] = (rows, factor)
        c = self.call_of.get(i, [])[k] if k < len(self.call_of.get(i, [])) else -1
        if 0 <= c < len(self.batch.calls):
            self.batch.calls[c].reached = True

    def add_output_rows(self, i: int, k: int, grad: torch.Tensor, factor: float) -> None:
        """Output-gradient rows of forward call k of layer i from an explicit pass ("mc"):
        the gradient of a batch-mean loss, times `factor` (its batch size)."""
        self._add(i, k, grad, factor)

    def scale(self) -> int:
        """E, the examples of the model calls the output gradients are multiplied by."""
        size = self.batch.size
        if size is None:
            raise RuntimeError(UNKNOWN_BATCH)
        return size
