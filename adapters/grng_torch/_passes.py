"""The extra passes a step may need, each from what torch gives (ALGORITHMS.md §1, §2).

`mc_pass`: the sampled-label ("mc") pass feeding the K-FAC hooks; `per_example`: per-example
gradients through torch.func; `grad_fn`: the batch gradient at other parameters from the
closure (finite differences); `hvp_fn`: Hessian-vector products by double backprop. Buffers
(BatchNorm statistics) are restored after them (`BufferSnapshot`), random numbers replayed.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from grng_torch._autocast import autocast_as
from grng_torch._functional import per_example_grads
from grng_torch._model_calls import check_unchanged
from grng_torch._pass_stats import collected_rows


class BufferSnapshot:
    """The model's buffers (BatchNorm running statistics), restored after the extra passes."""

    def __init__(self, root: nn.Module | None):
        self.saved = [] if root is None else [(b, b.detach().clone()) for b in root.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


def _loss_input(out, call, output_fn):
    """The tensor the closure's loss module took: output_fn(model output), reshaped as the
    closure reshaped it (nanoGPT's logits.view(-1, V))."""
    x = output_fn(out)
    if call.loss_input_shape is not None and tuple(x.shape) != call.loss_input_shape:
        x = x.reshape(call.loss_input_shape)
    return x


def mc_pass(opt, active: list[int], want_targets: bool):
    """Forward on every micro-batch of the closure, targets sampled from the outputs, and (for
    the K-FAC layers in `active`) the output gradients of the sampled-label loss. Returns the
    sampled targets per call (or None)."""
    coll = opt.collector
    sampled = []
    check_unchanged([call for _, call in coll.used_calls()], "the sampled-label pass (fisher='mc')")
    for c, call in coll.used_calls():
        coll.replaying = c  # the rows this pass collects belong to call c
        with contextlib.ExitStack() as stack:
            stack.callback(setattr, coll, "replaying", None)
            stack.enter_context(torch.enable_grad() if active else torch.no_grad())
            stack.enter_context(coll.collect("outputs", active))
            stack.enter_context(autocast_as(call.autocast))
            out = _loss_input(coll.root(*call.args, **call.kwargs), call, opt.output_fn)
            with torch.no_grad():
                y = opt.sample_targets(out.detach())
            loss = opt.loss_fn(out, y) if active else None
        sampled.append(y)
        if active:
            zs = [(li, k, z) for li in active for k, z in coll.z.get(li, [])]
            assert loss is not None
            got = torch.autograd.grad(loss, [z for _, _, z in zs], allow_unused=True)
            for (li, k, z), g in zip(zs, got):
                g = torch.zeros_like(z) if g is None else g.detach()
                coll.add_output_rows(li, k, g, call.size)
            coll.z = {}
    return sampled if want_targets else None


def per_example(opt, gis: list[int], sampled) -> dict[int, torch.Tensor]:
    """Per-example gradients of the params of groups `gis` over every micro-batch (the
    closure's targets, or the "mc" pass's sampled ones), concatenated."""
    coll = opt.collector
    calls = [call for _, call in coll.used_calls()]
    check_unchanged(calls, "per-example gradients")
    if coll.batch.repeats():
        raise RuntimeError(
            "per-example gradients need each example in one model call: this closure calls "
            "the model more than once on the same input tensor. Compute the outputs with one "
            "call (or use structure='kfac')")
    if sampled is None and not all(c.has_targets for c in calls):
        raise RuntimeError(
            "per-example gradients need the targets: the closure must call the loss_fn "
            "given to the optimizer as loss_fn(output, target) after each model call")
    params = [p for i in gis for p in opt.param_groups[i]["params"]]
    missing = [tuple(p.shape) for p in params if id(p) not in opt.param_names]
    if missing:
        raise ValueError(f"parameters of shapes {missing} are not in the model given to the "
                         "optimizer: per-example gradients need them there")
    names = [opt.param_names[id(p)] for p in params]
    parts = []
    for k, call in enumerate(calls):
        with torch.enable_grad(), coll.collect(None), autocast_as(call.autocast):
            parts.append(per_example_grads(
                coll.root, names, call.args, call.kwargs,
                call.targets if sampled is None else sampled[k], call.size, opt.loss_fn,
                opt.output_fn, call.loss_input_shape))
    out = parts[0] if len(parts) == 1 else {n: torch.cat([p[n] for p in parts]) for n in names}
    return {id(p): out[n] for p, n in zip(params, names)}


def _collecting(stack, coll, rows_of) -> None:
    """A shifted pass's hooks: quiet, or (`rows_of`) keeping its rows apart from the step's."""
    if coll is None:
        return
    if rows_of is None:
        stack.enter_context(coll.collect(None))
        return
    stack.enter_context(coll.side_pass())
    layers, _ = rows_of
    stack.enter_context(coll.collect("backward", list(layers), capture=True, rows_only=layers))


class SharedPasses(NamedTuple):
    """The shifted passes one step's groups share (`Oracle.along_fn`'s key -> `Pass`), and
    the rows every group asks of them ({hooked layer: passes stacked}, `_pass_stats.pass_rows`)."""

    cache: dict
    rows_only: dict


class Pass(NamedTuple):
    """A shifted pass: every parameter's gradient ({id(param): grad}) and the rows it left
    ({hooked layer: (a, s, examples)}) of the layers in `layers`."""

    grads: dict
    rows: dict
    layers: frozenset


def _run_pass(coll, passing, moved, wanted, rows_spec):
    """The closure at the `moved` values: ({id(p): gradient} of `wanted`, {layer: rows}
    of `rows_spec`'s layers or None). `passing`: the closure and what it restores."""
    closure, saved_grads, all_params, rng_before, devices, outer_autocast, snapshot = passing
    with torch.no_grad():  # through .data: another group's double-backprop graph keeps
        backup = [p.detach().clone() for p, _ in moved]  # them (restored exactly before use)
        for p, v in moved:
            p.data.copy_(v)
    for p in all_params:  # the closure's zero_grad cannot touch the saved .grad
        p.grad = None
    rows: list = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(autocast_as(outer_autocast))
            _collecting(stack, coll, rows_spec)
            stack.enter_context(torch.random.fork_rng(devices=devices))
            set_rng_state(rng_before, devices)
            closure()
            if rows_spec is not None:
                rows.append({li: collected_rows(coll, li) for li in rows_spec[0]
                             if coll.has_rows(li)})
        with torch.no_grad():
            grads = {id(p): torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                     for p in wanted}
    finally:
        with torch.no_grad():
            for (p, _), v in zip(moved, backup):
                p.data.copy_(v)
        for p, g in zip(all_params, saved_grads):
            p.grad = g
        if snapshot is not None:
            snapshot.restore()
    return grads, (rows[0] if rows else None)


def grad_fn(opt, i, closure, saved_grads, all_params, rng_before, devices, outer_autocast,
            snapshot, rows_of=None, along=None):
    """grad_fn(params) -> group i's batch gradient at other values of its params, from the
    closure (same batch and random numbers as the first evaluation); with `rows_of` ({hooked
    layer: passes stacked}, stats(lookup) giving their rows' Stats) also the pass's K-FAC rows
    (`Oracle.grad_rows_fn`, §2.1); with `along` (every group's parameters, the whole gradient,
    `_whole.vectors`, and the step's `SharedPasses`) along_fn(c, key), the same at θ + c·g
    (`Oracle.along_fn`): one pass for every group whose key is equal."""
    group_params = opt.param_groups[i]["params"]
    coll = opt.collector
    passing = (closure, saved_grads, all_params, rng_before, devices, outer_autocast, snapshot)

    def result(grads, rows):
        mine = [grads[id(p)] for p in group_params]
        return mine if rows_of is None else (mine, rows_of[1]((rows or {}).get))

    def gradient(new_params):
        return result(*_run_pass(coll, passing, list(zip(group_params, new_params)),
                                 group_params, rows_of))

    def along_fn(c, key=None):
        params, vecs, shared = along
        need = frozenset(rows_of[0]) if rows_of is not None else frozenset()
        hit = None if key is None else shared.cache.get(key)
        if hit is None or not need <= hit.layers:
            with torch.no_grad():
                moved = [(p, p + (c.to(v.device) * v.to(c.dtype)).to(p.dtype))
                         for p, v in zip(params, vecs) if v is not None]
            wanted = {**shared.rows_only, **(rows_of[0] if rows_of is not None else {})}
            grads, rows = _run_pass(coll, passing, moved, params,
                                    (wanted, None) if wanted else None)
            hit = Pass(grads, rows or {}, frozenset(wanted))
            if key is not None:
                shared.cache[key] = hit
        return result(hit.grads, hit.rows)

    return gradient if along is None else along_fn


def hvp_fn(opt, i, gb, start, collective, whole=None):
    """hvp_fn(params, v) -> H v for group i's block, by double backprop. With `whole` (the
    whole gradient over every group's parameters, `_whole.vectors`, and a cache the step's
    groups share): group i's rows of H·g, g the whole gradient, one double backward for all
    groups (the vector the core passes is group i's part of g)."""
    group_params = opt.param_groups[i]["params"]

    def product(gs, params, vs):
        use = [k for k, (g, v) in enumerate(zip(gs, vs))
               if g is not None and g.requires_grad and v is not None]
        out = [torch.zeros_like(p) for p in params]
        if use:  # a checkpointed forward recomputed here runs with the first pass's kernel
            with torch.enable_grad(), twice_differentiable_attention():
                got = torch.autograd.grad([gs[k] for k in use], [params[k] for k in use],
                                          grad_outputs=[vs[k].to(gs[k].dtype) for k in use],
                                          retain_graph=True, allow_unused=True)
            for k, h in zip(use, got):
                if h is not None:
                    out[k] = h.detach()
        if collective is not None and collective.mean is not None:
            out = [collective.mean(x) for x in out]
        return out

    def hvp_fn(_params, vectors):
        if whole is None:
            return product(gb.grads[start:start + len(group_params)], group_params,
                           list(vectors))
        vecs, cache = whole
        if "Hg" not in cache:
            every = [p for g in opt.param_groups for p in g["params"]]
            cache["Hg"] = product(gb.grads[:len(vecs)], every, vecs)
        return cache["Hg"][start:start + len(group_params)]

    return hvp_fn


def twice_differentiable_attention():
    """scaled_dot_product_attention on its math kernel: the fused (flash / efficient)
    kernels have no double backward, which double backprop needs."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def rng_state(devices: list[int]):
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), cuda


def set_rng_state(state, devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)
