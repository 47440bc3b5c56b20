"""The model calls a step collects (`Batch` of `Call`s: one per micro-batch of the closure, or
per forward since the previous closure-free step), kept so the optimizer can re-run the model
(per-example gradients, the "mc" Fisher's sampled-label pass) and count the batch's examples
(E, ALGORITHMS.md §2.1)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from grng_core.structures.rows import ambiguous_ids, shared_by_batch
from grng_core.user_frame import user_stacklevel
from grng_torch._layer_rows import storage_of

UNKNOWN_BATCH = (
    "the model's batch size is unknown (nothing was changed): the closure did not call the "
    "model given to the optimizer as model= with a tensor that has the batch axis. A model "
    "used through other methods (a VAE's encode and decode) or through its submodules directly "
    "makes no call of it: call the model itself (its forward) in the closure, or pass as model= "
    "the module whose forward the closure calls")


@dataclass
class Call:
    """One call of the model in the closure (one micro-batch), and its loss module call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    size: int | None = None  # the first tensor argument's batch axis (`batch_axis`)
    example: tuple | None = None  # that tensor's shape without the batch axis: one example's
    autocast: tuple = ()  # ((device_type, enabled, dtype), ...) at the forward call
    targets: Any = None
    has_targets: bool = False
    loss_input_shape: tuple | None = None  # the loss module's input (output_fn's result)
    # (id, version) of every tensor argument: a later call with the same runs the same
    # examples again (R-Drop, two heads' losses from two forwards); the first's storage
    key: tuple | None = None
    storage: int | None = None
    grad: bool = True  # gradients were enabled
    watched: bool = False  # an output of it (the model's, a hooked layer's) awaits a gradient
    outputs: tuple = ()  # the autograd nodes of the model's outputs (`_summed_loss`)
    reached: bool = False  # a gradient reached one of them

    def take_loss_call(self, args, kwargs) -> None:
        """Keep the targets and input shape of the loss module's call after this one."""
        if len(args) >= 2:
            target = args[1]
        elif "target" in kwargs:
            target = kwargs["target"]
        else:
            return
        self.targets = target.detach() if isinstance(target, torch.Tensor) else target
        self.has_targets = True
        inp = args[0] if args else kwargs.get("input")
        self.loss_input_shape = tuple(inp.shape) if isinstance(inp, torch.Tensor) else None

    def shares(self, x: torch.Tensor, axis: int, ids: bool) -> str | None:
        """Why a layer input `x` (token ids where `ids`) of this call is shared by its examples
        (`grng_core.structures.rows.shared_by_batch`), or None. One example's shape counts only
        for ids, and where `x` is not a slice of the call's input (a per-example loop's)."""
        one = ids and self.storage is not None and self.example is not None \
            and storage_of(x) not in (self.storage, None)
        return shared_by_batch(tuple(x.shape), self.size, axis, 0 if ids else 1,
                               (self.example,) if one else ())

    def ambiguous(self, x: torch.Tensor, axis: int) -> bool:
        """Token ids `x` of one example's shape (T,) with T the batch size, not from the
        call's input: shared position ids or per-example ids (`rows.ambiguous_ids`)."""
        return (self.example is not None and storage_of(x) not in (self.storage, None)
                and ambiguous_ids(tuple(x.shape), self.size, axis, (self.example,)))

    @property
    def used(self) -> bool:
        """Part of the batch: it ran with gradients and a gradient reached it (or nothing
        could tell). Not: an evaluation with gradients enabled, a metric's detached output."""
        return self.grad and (self.reached or not self.watched)


@dataclass
class Batch:
    """The model calls of the optimizer's closure (several when it accumulates micro-batches)."""

    calls: list[Call] = field(default_factory=list)

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def used(self) -> list[tuple[int, Call]]:
        """(index, call) of the calls that are part of the batch (`Call.used`)."""
        return [(c, call) for c, call in enumerate(self.calls) if call.used]

    def repeats(self) -> bool:
        """Whether a used call runs the examples of an earlier used one again."""
        keys = [call.key for _, call in self.used() if call.key is not None]
        return len(set(keys)) < len(keys)

    @property
    def size(self) -> int | None:
        """E: the examples of the used calls, a call with the same tensor arguments (`key`) as
        an earlier one counted once (None when a call's batch size is unknown)."""
        seen, sizes = set(), []
        for _, call in self.used():
            if call.key is None or call.key not in seen:
                seen.add(call.key)
                sizes.append(call.size)
        return None if not sizes or None in sizes else sum(sizes)  # type: ignore[arg-type]

    def add(self, call: Call, first: torch.Tensor | None) -> None:
        """Append a model call whose first tensor argument is `first`."""
        if first is not None:
            call.key = tensor_key(call)
            call.storage = storage_of(first)
        call.grad = torch.is_grad_enabled()
        self.calls.append(call)


def tensor_key(call: Call) -> tuple:
    """(id, version) of each tensor argument of `call` (alive: the call holds them)."""
    plain = not call.kwargs and all(isinstance(a, torch.Tensor) for a in call.args)
    leaves = call.args if plain else torch.utils._pytree.tree_leaves((call.args, call.kwargs))
    return tuple((id(t), t._version) for t in leaves if isinstance(t, torch.Tensor))


def check_unchanged(calls: list[Call], what: str) -> None:
    """Refuse to re-run calls whose input tensors were modified in place since their forward
    (one buffer refilled for every micro-batch): `what` would see the last micro-batch's."""
    if any(c.key is not None and tensor_key(c) != c.key for c in calls):
        raise RuntimeError(
            f"{what} re-runs the model on the inputs of each call in the closure, and an input "
            "tensor was modified in place after its call (a buffer refilled for each "
            "micro-batch): pass a new tensor to each call (or use fisher='empirical' with "
            "structure='kfac', which needs no re-run)")


def first_tensor(tree) -> torch.Tensor | None:
    """The first tensor among a call's arguments (args, kwargs)."""
    args = tree[0] if isinstance(tree, tuple) and tree else ()
    if args and isinstance(args[0], torch.Tensor):
        return args[0]  # the usual model(x, ...) call: no tree walk
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _named_tensors(args, kwargs):
    """(name, tensor) of a call's tensor arguments in order (nested ones under their
    argument's name)."""
    for name, value in [(f"positional argument {i}", a) for i, a in enumerate(args)] + \
            [(repr(k), v) for k, v in kwargs.items()]:
        for leaf in ((value,) if isinstance(value, torch.Tensor)
                     else torch.utils._pytree.tree_leaves(value)):
            if isinstance(leaf, torch.Tensor):
                yield name, leaf


def batch_of(args, kwargs, axis: int):
    """(the tensor giving a model call's batch, its size along `axis`, one example's shape,
    a note or None). The first tensor argument with that axis, unless it has 1 there and a
    later one has more and is evidently the batch: a copy of it over the batch (the same dtype
    and the same other axes: position ids (1, T) passed before the ids (B, T)), or any later
    one where the first is a scalar-like (1,) (an ODE's time before its state). Then that one,
    and the note says so; a later one with more that is neither leaves B = 1 with a note
    (`note_once` warns once)."""
    args = tuple(args)
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > axis \
            and args[0].shape[axis] != 1:  # the usual model(x, ...) call: no walk
        t = args[0]
        return t, int(t.shape[axis]), rest_shape(t, axis), None
    named = [(n, t) for n, t in _named_tensors(args, kwargs) if t.dim() > axis]
    if not named:
        return first_tensor((args, kwargs)), None, None, None
    name, t = named[0]
    note = None
    if t.shape[axis] == 1:
        more = [(n, u) for n, u in named[1:] if u.shape[axis] > 1]
        copy = next(((n, u) for n, u in more if u.dtype == t.dtype
                     and rest_shape(u, axis) == rest_shape(t, axis)), None)
        later = copy or (more[0] if more and t.dim() <= 1 else None)
        if later is not None:
            note = (f"the model's first tensor argument with a batch axis, {name}, has 1 along "
                    f"axis {axis} and {later[0]} has {later[1].shape[axis]}: the batch size is "
                    f"taken from {later[0]} (an input broadcast over the batch, such as position "
                    "ids (1, T) or an ODE's time, is not the batch). Pass the batch's tensor "
                    "first to silence this")
            name, t = later
        elif more:
            note = (f"the batch size is taken as 1 from the model's first tensor argument with "
                    f"a batch axis, {name}, though {more[0][0]} has {more[0][1].shape[axis]} "
                    f"along axis {axis}: if the batch holds {more[0][1].shape[axis]} examples, "
                    "pass its tensor first (the K-FAC statistics are scaled by the batch size)")
    return t, int(t.shape[axis]), rest_shape(t, axis), note


def rest_shape(t, axis: int) -> tuple:
    """A tensor's shape without axis `axis` (one example's)."""
    return tuple(t.shape[:axis] + t.shape[axis + 1:])


def note_once(owner, note: str | None) -> None:
    """Warn `batch_of`'s note once per collector (`owner.batch_noted`)."""
    if note is not None and not owner.batch_noted:
        owner.batch_noted = True
        warnings.warn(f"{note} (warned once per optimizer)", UserWarning,
                      stacklevel=user_stacklevel())


def unwrap(model: nn.Module) -> nn.Module:
    """The module DistributedDataParallel / DataParallel wrap (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


#: The model call of a layer call made outside any (the model's own embedding computing
#: inputs_embeds): the next model call's, once it starts (`bind_pending`).
PENDING = -2


def bind_pending(coll, c: int) -> None:
    """Give the layer calls made since the last model call, outside any, to model call `c`
    (their output is its input): its membership of the batch (`Call.used`) is theirs."""
    for i, calls in coll.call_of.items():
        for k, ci in enumerate(calls):
            if ci == PENDING:
                calls[k] = c
                if k in coll.hooked.get(i, ()):
                    coll.batch.calls[c].watched = True
    for decided in coll.warming.values():
        if PENDING in decided:
            decided[c] = decided.pop(PENDING)
    coll.pending = False
