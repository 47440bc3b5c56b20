"""RENG, RING and R-Kalman as `torch.optim.Optimizer` subclasses over `grng_core`.

The optimizer owns the param groups (one core optimizer each, rebuilt when a group's values
change), the module hooks (`_collect`) and the group states (`_groups.GroupState`). One step
is `grng_torch._step.run`; checkpoints are `_state_dict` (torch's own) and `_checkpoint`
(portable). See the package docstring (`grng_torch`) for the user-facing contract.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import grng_core as gc
from grng_core.algorithms import build
from grng_core.config import CONFIGS, TITLES
from grng_core.describe import StructureReport
from grng_core.incidents import Incidents
from grng_torch import _checkpoint, _describe, _state_dict, _step
from grng_torch._collect import Collector
from grng_torch._functional import LossModule, default_output, default_sampler
from grng_torch._groups import STATE_KEY, GroupState
from grng_torch._lr_watch import LrWatch
from grng_torch._model_calls import unwrap
from grng_torch._requirements import check_loss_reduction, check_needs
from grng_torch._skips import SkipMonitor


def hyperparameter_names(algorithm: str) -> list[str]:
    """The hyperparameters a param group holds: the fields of the core's config record."""
    return list(CONFIGS[algorithm].names())


def _plain(value):
    """A 0-d tensor hyperparameter (torch allows a tensor lr) as a Python number."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


class GRNGOptimizer(torch.optim.Optimizer):
    """Shared machinery of `RENG`, `RING` and `RKalman` (see the `grng_torch` docstring).

    Args:
        params: an iterable of parameters or of param-group dicts, as for any torch
            optimizer, or an `nn.Module` (then all its parameters form one group and it is
            also the `model`).
        lr: learning rate (default: the core's).
        model: the `nn.Module` the parameters belong to (DDP-wrapped or not): its Linear and
            Conv2d layers get the K-FAC hooks, and per-example gradients / "mc" passes re-run
            it. Needed by structure="kfac", structure="woodbury" and fisher="mc".
        loss_fn: the loss module the closure calls as `loss_fn(output, target)` (an
            `nn.Module`, reduction="mean"; a plain function is wrapped, then the closure must
            call `opt.loss_fn`). Needed for per-example gradients (structure="woodbury") and
            for fisher="mc".
        sample_targets: `fn(output) -> targets` drawn from the model's predictive
            distribution, for fisher="mc" (defaults exist for CrossEntropyLoss, NLLLoss,
            BCEWithLogitsLoss and MSELoss).
        output_fn: `fn(model output) -> the tensor loss_fn takes`, for the passes that re-run
            the model (per-example gradients, fisher="mc"). Default: the output itself, a
            Hugging Face `ModelOutput`'s `logits`, or a tuple's first element. A closure that
            reshapes it (nanoGPT's `logits.view(-1, V)`) is followed: the loss module's input
            shape is recorded at the closure's call.
        batch_axis: the examples' axis of the model call's first tensor argument (default
            0; 1 for a sequence-first model called with ids (T, B)): the output-gradient rows
            are scaled by its size (§2.1's B). Per-example gradients (structure "woodbury",
            "diagonal" with fisher="mc") need 0.
        collective: "auto" (torch.distributed all_reduce / all_gather when a process group of
            more than one rank is initialised), None (never), or a `grng_core.Collective`.
        **hyperparameters: the fields of the core's config record (`grng_core.RENGConfig`,
            `RINGConfig`, `RKalmanConfig`), validated when the optimizer or a group is built.
    """

    _algorithm = ""

    def __init__(self, params, lr: float | None = None, *, model: nn.Module | None = None,
                 loss_fn: Callable | None = None, sample_targets: Callable | None = None,
                 output_fn: Callable | None = None, collective: Any = "auto",
                 batch_axis: int = 0, **hyperparameters):
        title = type(self).__name__
        names = hyperparameter_names(self._algorithm)
        unknown = sorted(set(hyperparameters) - set(names))
        if unknown:
            raise TypeError(f"{title}() got unexpected keyword argument(s) {unknown}; its "
                            f"hyperparameters are {names}")
        defaults = CONFIGS[self._algorithm].defaults()
        defaults.update({} if lr is None else {"lr": lr}, **hyperparameters)
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError(f"{title}(module, model=other): pass the parameters or the "
                                 "module, and the model once")
            model, params = params, params.parameters()
        self._check_args(model, loss_fn, collective, batch_axis)
        if loss_fn is not None and not isinstance(loss_fn, nn.Module):
            loss_fn = LossModule(loss_fn)
        self.model = model
        self.loss_fn = loss_fn
        self.sample_targets = sample_targets or (default_sampler(loss_fn) if loss_fn else None)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self.output_fn = output_fn or default_output
        self.collective_arg = collective
        self.hp_names = names
        self._cores: list[tuple[tuple, gc.Optimizer | None]] = []
        self.skips = SkipMonitor()
        self.lr_watch = LrWatch()
        self.batch_axis = batch_axis
        self.collector = Collector(model, loss_fn, batch_axis) if model is not None else None
        if self.collector is not None:  # the hooks go when the optimizer goes
            weakref.finalize(self, self.collector.remove)
        root = unwrap(model) if model is not None else None
        self.param_names = {} if root is None else {id(p): n for n, p in root.named_parameters()}
        self._incidents: dict[int, Incidents] = {}
        self._warned_diagonal = False
        self.checked_loss = False  # the first closure loss's reduction (`_summed_loss`)
        self.loaded_groups: set[int] = set()  # groups whose state came from a checkpoint
        super().__init__(params, defaults)
        _describe.warn_if_mostly_diagonal(self)
        _describe.warn_if_mostly_frozen(self)
        _step.arm_for_closure_free(self)

    @staticmethod
    def _check_args(model, loss_fn, collective, batch_axis) -> None:
        if isinstance(batch_axis, bool) or not isinstance(batch_axis, int) or batch_axis < 0:
            raise ValueError(f"batch_axis must be an axis number >= 0 (the examples' axis of "
                             f"the model's first tensor argument), got {batch_axis!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_loss_reduction(loss_fn)
        if collective not in ("auto", None) and not isinstance(collective, gc.Collective):
            raise TypeError("collective must be 'auto', None or a grng_core.Collective")

    @property
    def algorithm(self) -> str:
        """"reng", "ring" or "rkalman"."""
        return self._algorithm

    # ------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        i = len(self.param_groups) - 1
        try:
            check_needs(self, self.build_core(self.param_groups[i]), i)
        except Exception:
            self.param_groups.pop()
            raise
        if not hasattr(self, "_cores"):
            self._cores = []
        self._cores.append(((), None))
        if getattr(self, "collector", None) is not None:  # not during __init__
            _step.arm_for_closure_free(self, only_if_armed=True)  # the new group's layers

    def build_core(self, group: dict, structure: str | None = None) -> gc.Optimizer:
        """The core optimizer of a group's values (validated), with `structure` overriding."""
        hp = {n: _plain(group[n]) for n in self.hp_names}
        if structure is not None:
            hp["structure"] = structure
        return build(CONFIGS[self._algorithm](**hp))

    def core(self, index: int = 0) -> gc.Optimizer:
        """The `grng_core.Optimizer` behind param group `index`, with its current values and
        the structure it runs (a "kfac" group without K-FAC layers runs "diagonal")."""
        group = self.param_groups[index]
        entry = self.group_state(index)
        structure = None
        if entry is not None and entry.structure != group["structure"]:
            if not (group["structure"] == "kfac" and entry.structure == "diagonal"):
                raise ValueError(
                    f"param group {index}: structure changed from {entry.structure!r} to "
                    f"{group['structure']!r} after the optimizer took steps; the state of one "
                    "structure cannot be used by another")
            structure = entry.structure
        key = tuple(_plain(group[n]) for n in self.hp_names) + (structure,)
        while len(self._cores) <= index:
            self._cores.append(((), None))
        cached_key, core = self._cores[index]
        if core is None or cached_key != key:
            core = self.build_core(group, structure)
            self._cores[index] = (key, core)
        return core

    def group_state(self, i: int) -> GroupState | None:
        """The state of param group i (None before its first step)."""
        params = self.param_groups[i]["params"]
        if not params or params[0] not in self.state:
            return None
        return self.state[params[0]].get(STATE_KEY)

    def set_group_state(self, i: int, entry: GroupState) -> None:
        self.state[self.param_groups[i]["params"][0]][STATE_KEY] = entry
        self._cores[i] = ((), None)

    def layer_candidates(self, i: int) -> list[tuple[int, int, int | None]]:
        """(hooked layer number, weight position, bias position or None) in group i."""
        if self.collector is None:
            return []
        pos = {id(p): j for j, p in enumerate(self.param_groups[i]["params"])}
        return [(li, pos[id(L.weight)], None if L.bias is None else pos.get(id(L.bias)))
                for li, L in enumerate(self.collector.layers) if id(L.weight) in pos]

    def first_step_layers(self, i: int) -> list[tuple[int, int, int | None]]:
        """The candidates of group i that can take K-FAC at its first step: a layer whose
        weight and bias are frozen (requires_grad=False) is left to the diagonal for the run
        (recorded in `collector.frozen` for describe()): it has no gradient to precondition,
        and its statistics would cost a refresh for nothing."""
        out = []
        for li, w, b in self.layer_candidates(i):
            if self.collector.layers[li].trainable:  # type: ignore[union-attr]
                out.append((li, w, b))
                self.collector.frozen.discard(li)  # type: ignore[union-attr]
            else:
                self.collector.frozen.add(li)  # type: ignore[union-attr]
        return self.fitting_layers(i, out)

    def fitting_layers(self, i: int, found) -> list[tuple[int, int, int | None]]:
        """The layers of `found` (group i) whose factors fit the core's `max_factor_dim`
        (§2.1); the others are recorded in `collector.oversized` with the core's reason (for
        describe() and a warning) and left to the diagonal structure."""
        if not found or self.param_groups[i]["structure"] != "kfac":
            return list(found)
        params = [p.detach() for p in self.param_groups[i]["params"]]
        why = self.core(i).too_large(params, self.layer_specs(found))
        for (li, _, _), reason in zip(found, why):
            if reason is None:  # (the group's limit may have changed since)
                self.collector.oversized.pop(li, None)  # type: ignore[union-attr]
            else:
                self.collector.oversized[li] = reason  # type: ignore[union-attr]
        return [L for L, reason in zip(found, why) if reason is None]

    def match_layers(self, i: int, specs) -> list[tuple[int, int, int | None]]:
        """(weight, bias) positions of group i mapped back to this model's hooked layers."""
        params = self.param_groups[i]["params"]
        layers = self.collector.layers if self.collector is not None else []
        by_weight = {id(L.weight): li for li, L in enumerate(layers)}
        out = []
        for w, b in specs:
            if not (0 <= w < len(params)) or id(params[w]) not in by_weight:
                raise ValueError(f"param group {i}: the saved state has a K-FAC layer with its "
                                 f"weight at position {w}, which is not the weight of a layer "
                                 "this optimizer's model hooks (opt.describe() lists them)")
            li = by_weight[id(params[w])]
            if b is not None and (not (0 <= b < len(params)) or params[b] is not layers[li].bias):
                raise ValueError(f"param group {i}: the saved K-FAC layer at position {w} has "
                                 f"its bias at position {b}, which is not that layer's bias")
            out.append((li, w, b))
        return out

    def layer_specs(self, found) -> list[gc.LayerSpec]:
        """The core's LayerSpecs of (hooked layer number, weight position, bias position)
        triples, oriented as the layers store their weights."""
        if not found:  # also an optimizer without `model=` (no collector)
            return []
        assert self.collector is not None
        layers = self.collector.layers
        return [gc.LayerSpec(w, b, layers[li].transposed, layers[li].a_diagonal,
                             layers[li].in_axes)
                for li, w, b in found]

    def fresh_group_state(self, i: int, present=None) -> tuple[GroupState, gc.Optimizer]:
        """The state group i starts from, with the K-FAC layers `present` (default: every
        hooked layer of the group); the core's `resolve` picks the fallback structure."""
        group = self.param_groups[i]
        core = self.core(i) if self.group_state(i) is None else self.build_core(group)
        if present is None:  # else `first_step_layers` chose them, the size limit applied
            present = self.fitting_layers(i, self.layer_candidates(i)) \
                if core.requirements.layer_stats else []
        specs = self.layer_specs(present)
        core = core.resolve(specs)
        with torch.no_grad():
            state = core.init([p.detach() for p in group["params"]],
                              layers=specs if core.config.structure == "kfac" else None)
        return GroupState(host_step=0, structure=core.config.structure, core=state), core

    def incidents(self, i: int = 0) -> Incidents:
        """Param group i's log of K-FAC factors that needed extra damping (host side)."""
        return _describe.incidents_for(self, i)

    def describe(self) -> StructureReport:
        """Which structure and layer (module path) each parameter is preconditioned with, the
        share of weight-matrix elements under K-FAC, factors that needed extra damping and
        skipped steps; `print(opt.describe())` shows the table. Before the first step the
        K-FAC layers are the candidates; the first step drops those the loss did not reach."""
        return _describe.report(self)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return _state_dict.save(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _state_dict.load(self, state_dict, super().load_state_dict)
        _step.arm_for_closure_free(self, only_if_armed=True)  # the loaded step's needs

    def save(self, path, group: int | None = None) -> None:
        """Write the optimizer state to `path` as a framework-neutral checkpoint (one .npz, no
        pickle, atomic; see `grng_torch._checkpoint` for the layouts)."""
        _checkpoint.save(self, path, group)

    def load(self, path, group: int | None = None, *, set_hyperparams: bool = False) -> None:
        """Replace the state by the one in `path` (from `save`, or any backend's
        `grng_core.save_state(path, state, opt=opt)`); hyperparameters must match (or are
        copied with `set_hyperparams=True`); ValueError leaves the optimizer unchanged."""
        _checkpoint.load(self, path, group, set_hyperparams)

    def check_nonfinite(self) -> None:
        """Report now (wait for the asynchronous counter copies of GPU groups) the steps
        skipped as non-finite that have not been reported yet; CPU steps warn at once."""
        self.skips.poll(wait=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's; and a closure-free step forgets the K-FAC rows of backward passes before
        it (their gradients are gone, with set_to_none=False too): an iteration whose step
        never came (a loss guard) leaves nothing behind."""
        super().zero_grad(set_to_none)
        coll = getattr(self, "collector", None)
        if coll is not None:
            coll.zeroed = True

    # --------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step. `closure` zeroes the gradients, runs the forward pass, calls
        `loss.backward()` and returns the loss; it may be called more than once. Without a
        closure (a training loop that calls `backward()` itself, then `step()`: Hugging
        Face's Trainer) the step uses the gradients and the K-FAC statistics of the backward
        passes since the previous step; RENG and R-Kalman with rho > 0 then refuse it."""
        return _step.run(self, closure)


def _doc(algorithm: str, summary: str) -> str:
    title = TITLES[algorithm]
    config = CONFIGS[algorithm]
    return f"""{summary}

    Built like any torch optimizer, plus the model it needs to see::

        opt = grng_torch.{title}(model.parameters(), model=model, loss_fn=criterion, lr=...)
        opt = grng_torch.{title}(model, loss_fn=criterion, lr=...)  # the same

    `step(closure)` takes the usual closure (zero_grad, forward, loss.backward(), return
    loss); {"without one RING steps on the loop's own backward()"
            if algorithm == "ring" else
            "with rho > 0 it needs one (it evaluates the loss again)"}. Param groups read the
    whole model where the algorithm does (README "Param groups split nothing").
    See `GRNGOptimizer` for the adapter arguments. Hyperparameters (param-group keys,
    `grng_core.{config.__name__}`):
{config.doc_table(indent="      ")}
    """


def _signature(algorithm: str) -> inspect.Signature:
    """(params, lr=None, *, model, loss_fn, sample_targets, collective, <config fields>)."""
    P = inspect.Parameter
    adapter = [p for p in inspect.signature(GRNGOptimizer.__init__).parameters.values()
               if p.name not in ("self", "hyperparameters")]
    fields = [p.replace(kind=P.KEYWORD_ONLY)
              for p in inspect.signature(CONFIGS[algorithm]).parameters.values()
              if p.name != "lr"]
    return inspect.Signature(adapter + fields)


class RENG(GRNGOptimizer):
    _algorithm = "reng"
    __doc__ = _doc("reng", "RENG, Regularized Explicit Natural Gradient: d = (F + λI)⁻¹ ĝ, "
                   "ĝ ≈ g + ρHg by double backprop (default) or finite differences.")


class RING(GRNGOptimizer):
    _algorithm = "ring"
    __doc__ = _doc("ring", "RING, Regularized Implicit Natural Gradient (one forward and "
                   "backward per step): form='adaptive_damping' (default) d = (F + (λ + "
                   "ρ‖g‖²)I)⁻¹ g; form='gauss_newton' d = (1 − ρλ)(F + λI)⁻¹ g + ρ g.")


class RKalman(GRNGOptimizer):
    _algorithm = "rkalman"
    __doc__ = _doc("rkalman", "R-Kalman, a Kalman filter over the parameters whose mean moves "
                   "along P ĝ (no Fisher is ever inverted).")


for _cls in (RENG, RING, RKalman):
    setattr(_cls, "__signature__", _signature(_cls._algorithm))  # noqa: B010 (mypy)
