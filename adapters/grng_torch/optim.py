"""RENG, RING and R-Kalman as `torch.optim.Optimizer` subclasses over `grng_core`.

The adapter collects what torch can give (gradients, K-FAC rows from module hooks,
per-example gradients from torch.func, Hessian-vector products from double backprop,
gradients at other parameters from the closure) and hands the tensors to the core, one core
optimizer per param group; the core's updates are added to the parameters in place.
See the package docstring (`grng_torch`) for the user-facing contract.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

import grng_core as gc
from grng_torch import _checkpoint
from grng_torch._backward import GraphBackward
from grng_torch._collect import (
    Collector,
    autocast_as,
    autocast_off,
    autocast_state,
    output_rows,
    unwrap,
)
from grng_torch._functional import LossModule, default_sampler, per_example_grads
from grng_torch.distributed import is_distributed, torch_collective

_FACTORIES: dict[str, Callable[..., gc.Optimizer]] = {
    "reng": gc.reng, "ring": gc.ring, "rkalman": gc.rkalman}
_TITLES = {"reng": "RENG", "ring": "RING", "rkalman": "RKalman"}
_STATE_KEY = "grng"


def hyperparameter_names(algorithm: str) -> list[str]:
    """The core builder's keyword arguments: the hyperparameters a param group holds."""
    return list(inspect.signature(_FACTORIES[algorithm]).parameters)


def _core_defaults(algorithm: str) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(_FACTORIES[algorithm]).parameters.items()}


def _plain(value):
    """A 0-d tensor hyperparameter (torch allows a tensor lr) as a Python number."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


def _describe(tree, path="state") -> dict[str, tuple]:
    """{path: (kind, shape, dtype)} of a core state pytree, for comparing layouts."""
    out: dict[str, tuple] = {}
    if isinstance(tree, dict):
        out[path] = ("dict", tuple(sorted(map(str, tree))), None)
        for k, v in tree.items():
            out.update(_describe(v, f"{path}[{k!r}]"))
    elif isinstance(tree, (list, tuple)):
        out[path] = ("list", len(tree), None)
        for i, v in enumerate(tree):
            out.update(_describe(v, f"{path}[{i}]"))
    elif isinstance(tree, torch.Tensor):
        out[path] = ("tensor", tuple(tree.shape), tree.dtype)
    else:
        out[path] = (type(tree).__name__, None, None)
    return out


class _BufferSnapshot:
    """The model's buffers (BatchNorm running statistics), restored after the extra passes."""

    def __init__(self, root: nn.Module | None):
        self.saved = [] if root is None else [(b, b.detach().clone()) for b in root.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


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
        collective: "auto" (torch.distributed all_reduce / all_gather when a process group of
            more than one rank is initialised), None (never), or a `grng_core.Collective`.
        **hyperparameters: every other keyword of the core builder (`grng_core.reng`,
            `ring` or `rkalman`): rho, damping, structure, gr, fisher, momentum, weight_decay,
            ... They are validated by the core when the optimizer (or a group) is built.
    """

    _algorithm = ""

    def __init__(self, params, lr: float | None = None, *, model: nn.Module | None = None,
                 loss_fn: Callable | None = None, sample_targets: Callable | None = None,
                 collective: Any = "auto", **hyperparameters):
        title = type(self).__name__
        names = hyperparameter_names(self._algorithm)
        unknown = sorted(set(hyperparameters) - set(names))
        if unknown:
            raise TypeError(f"{title}() got unexpected keyword argument(s) {unknown}; its "
                            f"hyperparameters are {names}")
        defaults = _core_defaults(self._algorithm)
        if lr is not None:
            defaults["lr"] = lr
        defaults.update(hyperparameters)
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError(f"{title}(module, model=other): pass the parameters or the "
                                 "module, and the model once")
            model, params = params, params.parameters()
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not isinstance(loss_fn, nn.Module):
            if not callable(loss_fn):
                raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
            loss_fn = LossModule(loss_fn)
        if collective not in ("auto", None) and not isinstance(collective, gc.Collective):
            raise TypeError("collective must be 'auto', None or a grng_core.Collective")
        self.model = model
        self.loss_fn = loss_fn
        self.sample_targets = sample_targets or (default_sampler(loss_fn) if loss_fn else None)
        self._collective_arg = collective
        self._hp_names = names
        self._cores: list[tuple[tuple, gc.Optimizer]] = []
        self._collector = Collector(model, loss_fn) if model is not None else None
        if self._collector is not None:  # the hooks go when the optimizer goes
            weakref.finalize(self, self._collector.remove)
        root = unwrap(model) if model is not None else None
        self._param_names = {} if root is None else {
            id(p): n for n, p in root.named_parameters()}
        super().__init__(params, defaults)

    # ------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            core = self._build(group, None)
            self._check_needs(core, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise
        if not hasattr(self, "_cores"):
            self._cores = []
        self._cores.append((self._key(group, None), core))

    def _key(self, group, structure) -> tuple:
        return tuple(_plain(group[n]) for n in self._hp_names) + (structure,)

    def _build(self, group, structure) -> gc.Optimizer:
        hp = {n: _plain(group[n]) for n in self._hp_names}
        if structure is not None:
            hp["structure"] = structure
        return _FACTORIES[self._algorithm](**hp)

    def core(self, index: int = 0) -> gc.Optimizer:
        """The `grng_core.Optimizer` behind param group `index`, with its current values."""
        return self._core(index)

    def _core(self, i: int) -> gc.Optimizer:
        group = self.param_groups[i]
        entry = self._entry(i)
        structure = None
        if entry is not None and entry["structure"] != group["structure"]:
            # a "kfac" group that has no K-FAC layer runs "diagonal" (the same math)
            if not (group["structure"] == "kfac" and entry["structure"] == "diagonal"):
                raise ValueError(
                    f"param group {i}: structure changed from {entry['structure']!r} to "
                    f"{group['structure']!r} after the optimizer took steps; the state of one "
                    "structure cannot be used by another")
            structure = entry["structure"]
        key = self._key(group, structure)
        while len(self._cores) <= i:
            self._cores.append(((), None))
        cached_key, core = self._cores[i]
        if core is None or cached_key != key:
            core = self._build(group, structure)
            self._cores[i] = (key, core)
        return core

    def _check_needs(self, core: gc.Optimizer, i: int) -> None:
        title = type(self).__name__
        r, h = core.requirements, core.hyperparams
        if r.layer_stats and self.model is None:
            raise ValueError(
                f"{title} with structure={h['structure']!r} (param group {i}) needs to see the "
                f"model's layers: {title}(model.parameters(), model=model, ...) or "
                f"{title}(model, ...)")
        if r.per_example_grads and (self.model is None or self.loss_fn is None):
            raise ValueError(
                f"{title} with structure={h['structure']!r} (param group {i}) needs per-example "
                "gradients: pass model= and loss_fn= (the loss module the closure calls)")
        if r.fisher == "mc" and (r.layer_stats or r.per_example_grads):
            if self.model is None or self.loss_fn is None:
                raise ValueError(f"{title} with fisher='mc' (param group {i}) needs model= and "
                                 "loss_fn= to run the sampled-label pass")
            if self.sample_targets is None:
                raise ValueError(
                    f"{title} with fisher='mc' needs sample_targets=fn(output) -> targets: no "
                    f"default sampler for loss {type(self.loss_fn).__name__}")
        if (r.per_example_grads or r.fisher == "mc") and self.loss_fn is not None:
            reduction = getattr(self.loss_fn, "reduction", "mean")
            if reduction != "mean":
                raise ValueError(f"loss_fn must average over the batch (reduction='mean'), got "
                                 f"reduction={reduction!r}")

    # -------------------------------------------------------------- state
    def _entry(self, i: int) -> dict | None:
        params = self.param_groups[i]["params"]
        if not params or params[0] not in self.state:
            return None
        return self.state[params[0]].get(_STATE_KEY)

    def _candidate_layers(self, i: int) -> list[tuple[int, int, int | None]]:
        """(collector layer number, weight position, bias position or None) in group i."""
        if self._collector is None:
            return []
        pos = {id(p): j for j, p in enumerate(self.param_groups[i]["params"])}
        out = []
        for li, L in enumerate(self._collector.layers):
            if id(L.weight) in pos:
                b = None if L.bias is None else pos.get(id(L.bias))
                out.append((li, pos[id(L.weight)], b))
        return out

    def _saved_layers(self, i: int, specs) -> list[tuple[int, int, int | None]]:
        """Saved (weight, bias) positions mapped back to this model's layers."""
        params = self.param_groups[i]["params"]
        by_weight = {id(L.weight): li for li, L in enumerate(self._collector.layers)} \
            if self._collector is not None else {}
        out = []
        for w, b in specs:
            if not (0 <= w < len(params)) or id(params[w]) not in by_weight:
                raise ValueError(f"param group {i}: the saved state has a K-FAC layer with its "
                                 f"weight at position {w}, which is not a Linear/Conv2d weight "
                                 "of this optimizer's model")
            li = by_weight[id(params[w])]
            bias = self._collector.layers[li].bias
            if b is not None and (not (0 <= b < len(params)) or params[b] is not bias):
                raise ValueError(f"param group {i}: the saved K-FAC layer at position {w} has "
                                 f"its bias at position {b}, which is not that layer's bias")
            out.append((li, w, b))
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[_STATE_KEY] = {"algorithm": self._algorithm, "format": 1}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        title = type(self).__name__
        state_dict = dict(state_dict)
        meta = state_dict.pop(_STATE_KEY, None)
        if meta is not None and meta.get("algorithm") != self._algorithm:
            raise ValueError(f"this state dict is from grng_torch."
                             f"{_TITLES.get(meta.get('algorithm'), meta.get('algorithm'))}, "
                             f"not {title}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this {title} has {len(self.param_groups)}")
        blobs: dict[int, dict] = {}
        state = {}
        for pid, v in state_dict["state"].items():
            if isinstance(v, dict) and _STATE_KEY in v:
                v = dict(v)
                blobs[pid] = v.pop(_STATE_KEY)
            state[pid] = v
        checked = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            missing = [n for n in self._hp_names if n not in saved]
            if missing:
                raise ValueError(f"param group {i} of the loaded state dict lacks {title} "
                                 f"hyperparameters {missing}: it is not from a {title}")
            params = group["params"]
            if len(saved["params"]) != len(params):
                raise ValueError(f"param group {i}: the loaded state dict has "
                                 f"{len(saved['params'])} parameters, this optimizer has "
                                 f"{len(params)}")
            blob = blobs.get(saved["params"][0]) if saved["params"] else None
            if blob is not None:
                checked.append((i, self._check_blob(i, saved, blob)))
        super().load_state_dict({**state_dict, "state": state})
        for i, blob in checked:
            p0 = self.param_groups[i]["params"][0]
            dev = p0.device
            core_state = pytree.tree_map(
                lambda x, dev=dev: x.to(dev) if isinstance(x, torch.Tensor) else x, blob["core"])
            self.state[p0][_STATE_KEY] = {**blob, "core": core_state}
        self._cores = [((), None)] * len(self.param_groups)

    def _check_blob(self, i: int, saved_group: dict, blob: dict) -> dict:
        """The saved core state must have the layout this model's parameters give."""
        try:
            params = [p.detach() for p in self.param_groups[i]["params"]]
            hp = {n: _plain(saved_group[n]) for n in self._hp_names}
            hp["structure"] = blob["structure"]
            core = _FACTORIES[self._algorithm](**hp)
            layers = self._saved_layers(i, blob["layers"])
            specs = [gc.LayerSpec(w, b) for _, w, b in layers] or None
            with torch.no_grad():
                fresh = core.init(params, layers=specs)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"the loaded state dict does not fit this optimizer (param group "
                             f"{i}): {e}") from e
        want, got = _describe(fresh), _describe(blob["core"])
        for path in sorted(set(want) | set(got)):
            if want.get(path) != got.get(path):
                raise ValueError(
                    f"the loaded state dict does not fit this optimizer (param group {i}): "
                    f"{path} is {got.get(path)} in the state dict, this model needs "
                    f"{want.get(path)} (a different model or optimizer configuration)")
        return blob

    # ---------------------------------------------------- portable checkpoints
    def save(self, path, group: int | None = None) -> None:
        """Write the optimizer state to `path` as a framework-neutral checkpoint (one .npz,
        no pickle, written atomically; `grng_core.save_state`).

        With one param group (or `group=k`) the file holds exactly that group's core state
        and its core optimizer's name and hyperparameters, so
        `grng_core.load_state(path, like=core.init(params), opt=core)` reads it into any
        backend. With several groups it holds `{"groups": [state_0, ...]}` and per-group
        metadata; move it to another framework per group (`grng_torch.extract_group`).
        Before the first step the state a first step would start from is written.
        """
        _checkpoint.save(self, path, group)

    def load(self, path, group: int | None = None, *, set_hyperparams: bool = False) -> None:
        """Replace the state by the one in `path`: a file from `save`, or a core state saved
        by any backend with `grng_core.save_state(path, state, opt=opt)` (NumPy, JAX, CuPy,
        grng_cupy's `save`, ...), placed on the parameters' devices.

        The optimizer name and hyperparameters recorded in the file must equal the param
        group's (`set_hyperparams=True` copies the file's numeric ones, e.g. an lr a
        scheduler had changed, into the group instead); the state's shapes must fit the
        parameters, and its K-FAC layers ("weight/bias/N" positions in the group) must be
        Linear/Conv2d layers of the model -- before the first step they are registered from
        the file, afterwards they must equal the registered ones. The host step counter
        becomes the state's step + skipped. `group=k` loads a single-group file into group k
        (or group k of a multi-group file). Raises ValueError (FileNotFoundError) and leaves
        the optimizer unchanged when the file does not fit, is corrupted or holds a pickle.
        """
        _checkpoint.load(self, path, group, set_hyperparams)

    # --------------------------------------------------------------- step
    def _collective(self):
        c = self._collective_arg
        if c == "auto":
            return torch_collective() if is_distributed() else None
        return c

    def step(self, closure: Callable[[], Any] | None = None):  # noqa: C901 - one pass, in order
        """One optimizer step. `closure` zeroes the gradients, runs the forward pass, calls
        `loss.backward()` and returns the loss; it may be called more than once."""
        title = type(self).__name__
        if closure is None or not callable(closure):
            raise TypeError(
                f"{title}.step() needs a closure (got {closure!r}): the optimizer re-evaluates "
                "the loss where the algorithm needs it. Write\n"
                "    def closure():\n        opt.zero_grad()\n        loss = loss_fn(model(x), y)"
                "\n        loss.backward()\n        return loss\n    opt.step(closure)")
        groups = [(i, g) for i, g in enumerate(self.param_groups) if g["params"]]
        cores = {i: self._core(i) for i, _ in groups}
        entries = {i: self._entry(i) for i, _ in groups}
        ts = {i: (entries[i]["step"] if entries[i] else 0) + 1 for i, _ in groups}
        flags = {i: cores[i].refresh_flags(ts[i]) for i, _ in groups}
        coll = self._collector

        # the K-FAC layers of each group: saved ones, or candidates on the first step
        layers: dict[int, list] = {}
        for i, _ in groups:
            if not cores[i].requirements.layer_stats:
                layers[i] = []
            elif entries[i] is not None:
                layers[i] = self._saved_layers(i, entries[i]["layers"])
            else:
                layers[i] = self._candidate_layers(i)
        emp, mc = set(), set()
        pe_groups: dict[str, list[int]] = {"empirical": [], "mc": []}
        for i, _ in groups:
            r, curvature = cores[i].requirements, flags[i][0]
            if r.layer_stats and curvature:
                (mc if r.fisher == "mc" else emp).update(li for li, _, _ in layers[i])
            if r.per_example_grads and curvature:
                pe_groups[r.fisher].append(i)
        hvp_groups = [i for i, _ in groups if cores[i].requirements.hvp_fn]
        fd = any(cores[i].requirements.grad_fn for i, _ in groups)

        all_params = [p for _, g in groups for p in g["params"]]
        offsets, n = {}, 0
        for i, g in groups:  # where group i starts in all_params
            offsets[i], n = n, n + len(g["params"])
        outer_autocast = _autocast_now()
        devices = sorted({p.device.index or 0 for p in all_params if p.is_cuda})
        rng_before = _rng_state(devices) if fd else None
        gb = None
        if hvp_groups:
            real = isinstance(self.model, nn.parallel.DistributedDataParallel)
            quiet = (lambda: coll.collect(None)) if coll is not None else contextlib.nullcontext
            gb = GraphBackward(all_params, real_backward=real, quiet=quiet)  # every group's .grad
        snapshot = None
        try:
            # 1. the batch gradient, with K-FAC rows from its backward (empirical Fisher)
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.enable_grad())
                if coll is not None:
                    coll.clear()
                    stack.enter_context(coll.collect("backward", emp, capture=True))
                if gb is not None:
                    stack.enter_context(gb)
                    stack.enter_context(_twice_differentiable_attention())
                loss = closure()
            if gb is not None and gb.grads is None:
                raise RuntimeError(f"{title} with gr='double_backprop' needs the closure to call "
                                   "loss.backward() (the optimizer keeps its graph)")
            grads = {i: [p.grad for p in g["params"]] for i, g in groups}
            saved_grads = [p.grad for p in all_params]
            if coll is not None and (mc or any(pe_groups.values()) or fd):
                snapshot = _BufferSnapshot(coll.root)  # after the closure's own update

            # 2. extra passes: sampled labels ("mc"), per-example gradients (torch.func)
            pe: dict[int, torch.Tensor] = {}
            if mc or any(pe_groups.values()):
                if not coll.batch.called:
                    raise RuntimeError(f"{title} needs the closure to call the model given to "
                                       "the optimizer (its inputs are re-used)")
                y_mc = self._mc_pass(sorted(mc), bool(pe_groups["mc"])) \
                    if (mc or pe_groups["mc"]) else None
                for kind, gis in pe_groups.items():
                    if gis:
                        pe.update(self._per_example(gis, y_mc if kind == "mc" else None))

            # 3. the core's update of each group (all computed before any is applied)
            collective = self._collective()
            results = {}
            with torch.no_grad(), autocast_off():
                for i, group in groups:
                    core, (curvature, inverse) = cores[i], flags[i]
                    params = [p.detach() for p in group["params"]]
                    gl = [torch.zeros_like(p) if x is None else x.detach()
                          for p, x in zip(params, grads[i])]
                    entry = entries[i]
                    if entry is None:
                        entry, core = self._new_entry(i, core, params, layers)
                        layers[i] = self._saved_layers(i, entry["layers"])
                    stats = None
                    if curvature and (core.requirements.layer_stats
                                      or core.requirements.per_example_grads):
                        stats = gc.Stats(
                            per_example_grads=[pe[id(p)] for p in group["params"]]
                            if i in pe_groups["empirical"] + pe_groups["mc"] else None,
                            layers=[gc.LayerStats(w, b, *coll.rows(li))
                                    for li, w, b in layers[i]] or None)
                    oracle = gc.Oracle(
                        grad_fn=self._grad_fn(i, closure, saved_grads, all_params, rng_before,
                                              devices, outer_autocast, snapshot)
                        if core.requirements.grad_fn else None,
                        hvp_fn=self._hvp_fn(i, gb, offsets[i], collective)
                        if core.requirements.hvp_fn else None)
                    updates, new_state = core.update(gl, entry["core"], params, stats=stats,
                                                     oracle=oracle, collective=collective,
                                                     curvature=curvature, inverse=inverse)
                    results[i] = (updates, {**entry, "step": ts[i], "core": new_state})

            # 4. apply: θ ← θ + u (parameters without a gradient are left alone, as in torch)
            with torch.no_grad():
                for i, group in groups:
                    updates, entry = results[i]
                    for p, x, u in zip(group["params"], grads[i], updates):
                        if x is not None:
                            p.add_(u)
                    self.state[group["params"][0]][_STATE_KEY] = entry
        finally:
            if snapshot is not None:
                snapshot.restore()
            if coll is not None:
                coll.clear()
            if gb is not None:
                gb.grads = None  # frees the gradient's graph
        return loss

    # ---------------------------------------------------------- the passes
    def _new_entry(self, i, core, params, layers):
        """Core state of group i at its first step, with the layers that took part."""
        coll = self._collector
        present = [(li, w, b) for li, w, b in layers[i]
                   if coll is not None and coll.a.get(li) and coll.s.get(li)]
        structure = core.hyperparams["structure"]
        if structure == "kfac" and not present:
            structure = "diagonal"  # no K-FAC layer in this group: every leaf is diagonal
            self._cores[i] = (self._key(self.param_groups[i], structure),
                              self._build(self.param_groups[i], structure))
            core = self._cores[i][1]
        specs = [gc.LayerSpec(w, b) for _, w, b in present] if structure == "kfac" else None
        state = core.init(params, layers=specs)
        entry = {"step": 0, "structure": structure,
                 "layers": [[w, b] for _, w, b in present] if structure == "kfac" else [],
                 "core": state}
        return entry, core

    def _mc_pass(self, active: list[int], want_targets: bool):
        """Forward on the batch, targets sampled from the outputs, and (for the K-FAC layers
        in `active`) the output gradients of the sampled-label loss."""
        coll = self._collector
        b = coll.batch
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad() if active else torch.no_grad())
            stack.enter_context(coll.collect("outputs", active))
            stack.enter_context(autocast_as(b.autocast))
            out = coll.root(*b.args, **b.kwargs)
            with torch.no_grad():
                y = self.sample_targets(out.detach())
            loss = self.loss_fn(out, y) if active else None
        if active:
            zs = [(li, z) for li in active for z in coll.z.get(li, [])]
            got = torch.autograd.grad(loss, [z for _, z in zs], allow_unused=True)
            n = coll.scale()
            for (li, z), g in reversed(list(zip(zs, got))):
                g = torch.zeros_like(z) if g is None else g.detach()
                coll.s.setdefault(li, []).append(output_rows(coll.layers[li], g) * n)
            coll.z = {}
        return y if want_targets else None

    def _per_example(self, gis: list[int], sampled) -> dict[int, torch.Tensor]:
        coll = self._collector
        b = coll.batch
        if sampled is None and not b.has_targets:
            raise RuntimeError(
                "per-example gradients need the targets: the closure must call the loss_fn "
                "given to the optimizer as loss_fn(output, target)")
        params = [p for i in gis for p in self.param_groups[i]["params"]]
        missing = [tuple(p.shape) for p in params if id(p) not in self._param_names]
        if missing:
            raise ValueError(f"parameters of shapes {missing} are not in the model given to the "
                             "optimizer: per-example gradients need them there")
        names = [self._param_names[id(p)] for p in params]
        with torch.enable_grad(), coll.collect(None), autocast_as(b.autocast):
            out = per_example_grads(coll.root, names, b.args, b.kwargs,
                                    b.targets if sampled is None else sampled, coll.scale(),
                                    self.loss_fn)
        return {id(p): out[n] for p, n in zip(params, names)}

    def _grad_fn(self, i, closure, saved_grads, all_params, rng_before, devices,
                 outer_autocast, snapshot):
        """grad_fn(params) -> the batch gradient of group i at other values of its params,
        from the closure (same batch, same random numbers as the first evaluation)."""
        group_params = self.param_groups[i]["params"]
        coll = self._collector

        def grad_fn(new_params):
            new = list(new_params)
            with torch.no_grad():
                backup = [p.detach().clone() for p in group_params]
                for p, v in zip(group_params, new):
                    p.copy_(v)
            for p in all_params:  # the closure's zero_grad cannot touch the saved .grad
                p.grad = None
            try:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(torch.enable_grad())
                    stack.enter_context(autocast_as(outer_autocast))
                    if coll is not None:
                        stack.enter_context(coll.collect(None))
                    stack.enter_context(torch.random.fork_rng(devices=devices))
                    _set_rng_state(rng_before, devices)
                    closure()
                with torch.no_grad():
                    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                            for p in group_params]
            finally:
                with torch.no_grad():
                    for p, v in zip(group_params, backup):
                        p.copy_(v)
                for p, g in zip(all_params, saved_grads):
                    p.grad = g
                if snapshot is not None:
                    snapshot.restore()

        return grad_fn

    def _hvp_fn(self, i, gb, start, collective):
        """hvp_fn(params, v) -> H v for group i's block, by double backprop."""
        group_params = self.param_groups[i]["params"]

        def hvp_fn(_params, vectors):
            gs = gb.grads[start:start + len(group_params)]
            vs = list(vectors)
            idx = [j for j, g in enumerate(gs) if g is not None and g.requires_grad]
            out = [torch.zeros_like(p) for p in group_params]
            if idx:
                with torch.enable_grad():
                    got = torch.autograd.grad(
                        [gs[j] for j in idx], [group_params[j] for j in idx],
                        grad_outputs=[vs[j].to(gs[j].dtype) for j in idx],
                        retain_graph=True, allow_unused=True)
                for j, h in zip(idx, got):
                    if h is not None:
                        out[j] = h.detach()
            if collective is not None and collective.mean is not None:
                out = [collective.mean(x) for x in out]
            return out

        return hvp_fn


def _autocast_now() -> tuple:
    return autocast_state()


def _twice_differentiable_attention():
    """scaled_dot_product_attention on its math kernel: the fused (flash / efficient)
    kernels have no double backward, which double backprop needs."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _rng_state(devices: list[int]):
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), cuda


def _set_rng_state(state, devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def _doc(algorithm: str, summary: str) -> str:
    title = _TITLES[algorithm]
    names = ", ".join(hyperparameter_names(algorithm))
    return f"""{summary}

    Built like any torch optimizer, plus the model it needs to see::

        opt = grng_torch.{title}(model.parameters(), model=model, loss_fn=criterion, lr=...)
        opt = grng_torch.{title}(model, loss_fn=criterion, lr=...)  # the same

    `step(closure)` needs a closure (zero_grad, forward, loss.backward(), return loss).
    Hyperparameters (param-group keys, validated by `grng_core.{algorithm}`): {names}.
    See `GRNGOptimizer` for the arguments and the `grng_torch` docstring for the contract.
    """


class RENG(GRNGOptimizer):
    _algorithm = "reng"
    __doc__ = _doc("reng", "RENG, Regularized Explicit Natural Gradient: d = (F + λI)⁻¹ ĝ, "
                   "ĝ ≈ g + ρHg by double backprop (default) or finite differences.")


class RING(GRNGOptimizer):
    _algorithm = "ring"
    __doc__ = _doc("ring", "RING, Regularized Implicit Natural Gradient: "
                   "d = (1 − ρλ)(F + λI)⁻¹ g + ρ g (one forward and backward per step).")


class RKalman(GRNGOptimizer):
    _algorithm = "rkalman"
    __doc__ = _doc("rkalman", "R-Kalman, a Kalman filter over the parameters whose mean moves "
                   "along P ĝ (no Fisher is ever inverted).")

