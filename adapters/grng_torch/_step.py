"""One step of a GRNG torch optimizer, in order (see `run`):

1. `plan`: per param group, its core optimizer, refresh flags (`core.flags(host step)`), its
   K-FAC layers and which passes the step needs;
2. `_first_pass`: the closure, with K-FAC rows collected by the hooks during its backward
   (empirical Fisher) and, for double backprop, the gradient's graph kept;
3. `_extra_passes`: sampled labels ("mc") and per-example gradients (`_passes`);
4. `_update_groups`: each group's `grng_core` update, reading the whole model where the
   algorithm does (`_whole`; all computed before any is applied);
5. `_apply`: θ ← θ + u in place, the new `GroupState` stored.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import grng_core as gc
from grng_core.requirements import stacked_passes
from grng_torch import _describe, _pass_stats, _passes
from grng_torch import _sequence_first as sequence_first
from grng_torch._autocast import autocast_off, autocast_state
from grng_torch._backward import GraphBackward, double_backward_error
from grng_torch._closure_free import CLOSURE_HELP, check_closure_free, closure_needs
from grng_torch._groups import STATE_KEY, GroupState
from grng_torch._pass_stats import (
    absent_under_collective,
    collected_rows,
    layer_stats,
    on_host,
    rows_of_passes,
)
from grng_torch._plan import GroupPlan, StepEnv, StepPlan
from grng_torch._summed_loss import warn_if_summed
from grng_torch._whole import kl_total, skip_together, vectors, whole_of
from grng_torch.distributed import is_distributed, torch_collective


def _group_plan(opt, i: int, group: dict, arming: bool = False) -> GroupPlan:
    core, entry = opt.core(i), opt.group_state(i)
    step = entry.host_step if entry else 0
    curvature, inverse = core.flags(step)
    layers: list = []
    if core.requirements.layer_stats:  # arming: frozen or not is decided at the step
        layers = (opt.match_layers(i, entry.layers) if entry is not None
                  else opt.fitting_layers(i, opt.layer_candidates(i)) if arming
                  else opt.first_step_layers(i))
    return GroupPlan(i, group, core, entry, bool(curvature), bool(inverse), layers,
                     steady=core.steady_flags(step))


def plan(opt, arming: bool = False) -> StepPlan:
    """The next step's plan (`arming`: for the hooks of a step without a closure, which
    collect every candidate layer of a group's first step)."""
    replicated = _collective(opt) is not None
    sp = StepPlan([_group_plan(opt, i, g, arming) for i, g in enumerate(opt.param_groups)
                   if g["params"]])
    n = 0
    for gp in sp.groups:
        gp.offset, n = n, n + len(gp.group["params"])
        if replicated:  # ranks may see different rows (dynamic padding) and must issue the
            gp.steady = None  # same collectives: every layer takes the warm-up (§2.1)
        r = gp.core.requirements
        if r.layer_stats and gp.curvature:
            (sp.mc if r.fisher == "mc" else sp.emp).update(li for li, _, _ in gp.layers)
            if gp.steady is not None and gp.steady[0] is False:
                sp.warmup_only.update((li, gp.core.config) for li, _, _ in gp.layers)
            sp.grams.update(_pass_stats.gram_layers(opt, gp))
        elif (r.layer_rows or r.fd_rows) and not replicated and on_host(gp):
            # the factored form's rows (§2.1): hooks only, and only where it can be chosen
            gp.rows_only = True
            linear = [li for li, _, _ in gp.layers if opt.collector.layers[li].kind == "linear"]
            sp.emp.update(linear)
            passes = stacked_passes(gp.core.config)
            sp.rows_only.update((li, passes) for li in linear)
        if r.per_example_grads and gp.curvature:
            sp.pe[r.fisher].append(gp.index)
        sp.hvp |= r.hvp_fn
        sp.fd |= r.grad_fn
    if (sp.hvp or sp.fd) and opt.model is not None:
        sp.bystanders = _bystanders(opt.model, sp.all_params)
    return sp


def _bystanders(model: nn.Module, owned: list) -> list:
    """The model's trainable parameters that no param group holds. The extra passes of a
    finite-difference or double-backprop step re-run the closure; without this their `.grad`
    would end as a shifted point's (or None), and another optimizer stepping them after this
    one (e.g. AdamW on a tied embedding) would read a wrong gradient."""
    ids = {id(p) for p in owned}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


def _collective(opt):
    c = opt.collective_arg
    if c == "auto":
        return torch_collective() if is_distributed() else None
    return c


def run(opt, closure):
    title = type(opt).__name__
    if closure is not None and not callable(closure):
        raise TypeError(f"{title}.step() needs a closure (got {closure!r}): {CLOSURE_HELP}")
    _reports_of_earlier_steps(opt)
    sp = plan(opt)
    coll = opt.collector
    if coll is not None:
        coll.loss_scale = 1.0  # a closure-free step under an enabled GradScaler sets its own
    if closure is None:
        check_closure_free(opt, sp)
    elif coll is not None:
        coll.disarm()  # a closure user: collection happens inside the closure only
    outer_autocast = autocast_state()
    devices = sorted({p.device.index or 0 for p in sp.all_params if p.is_cuda})
    rng_before = _passes.rng_state(devices) if sp.fd else None
    gb = None
    if sp.hvp:
        real = isinstance(opt.model, nn.parallel.DistributedDataParallel)
        quiet = (lambda: coll.collect(None)) if coll is not None else contextlib.nullcontext
        own = coll.passes.own if coll is not None else contextlib.nullcontext
        gb = GraphBackward(sp.graded, real_backward=real, quiet=quiet, own=own)
    snapshot = None
    try:
        loss = _first_pass(opt, sp, closure, gb) if closure is not None else None
        warn_if_summed(opt, loss, first=[gp.entry is None for gp in sp.groups])
        grads = {gp.index: [p.grad for p in gp.group["params"]] for gp in sp.groups}
        _refuse_gradients(opt, sp, grads, closure)
        saved_grads = [p.grad for p in sp.graded]
        if coll is not None and (sp.mc or any(sp.pe.values()) or sp.fd):
            snapshot = _passes.BufferSnapshot(coll.root)  # after the closure's own update
        pe = _extra_passes(opt, sp)
        env = StepEnv(closure=closure, saved_grads=saved_grads, rng_before=rng_before,
                      devices=devices, outer_autocast=outer_autocast, snapshot=snapshot,
                      gb=gb, collective=_collective(opt), pe=pe)
        with torch.no_grad(), autocast_off():
            results = _update_groups(opt, sp, grads, env)
        _apply(opt, sp, grads, results)
        if any(gp.entry is None for gp in sp.groups):  # the first step fixed the layers
            _describe.warn_if_mostly_diagonal(opt)
    except RuntimeError as e:
        better = double_backward_error(title, sp.hvp, e)
        if better is not None:
            raise better from e
        raise
    finally:
        if snapshot is not None:
            snapshot.restore()
        if coll is not None:
            coll.clear()
            if closure is None:  # the user's next forward and backward feed the next step
                arm_for_closure_free(opt)
        if gb is not None:
            gb.grads = None  # frees the gradient's graph
    return loss


def _reports_of_earlier_steps(opt) -> None:
    """What the steps before this one found, said now: skips on a GPU (their copies have
    landed), an lr changed by a scheduler while the trust region bound, a layer frozen at the
    first step that is trainable now; after a first step, the sequence-first watch goes."""
    opt.skips.poll()
    opt.lr_watch.check(opt)
    _describe.warn_if_unfrozen(opt)
    if opt.state and opt.collector is not None:
        sequence_first.stop(opt.collector)


def _refuse_sparse(opt, sp: StepPlan) -> None:
    """Sparse gradients (`nn.Embedding(sparse=True)`) have no curvature statistics here: a
    clear error before anything changes, as torch.optim.Adam gives."""
    sparse = [opt.param_names.get(id(p), tuple(p.shape)) for p in sp.all_params
              if p.grad is not None and p.grad.layout != torch.strided]
    if sparse:
        raise RuntimeError(f"{type(opt).__name__} does not support sparse gradients (parameters "
                           f"{sparse}; nothing was changed): build the nn.Embedding / "
                           "nn.EmbeddingBag with sparse=False")


def arm_for_closure_free(opt, only_if_armed: bool = False) -> None:
    """Open the hooks for a step without a closure (the user's own backward feeds it), with
    the plan of the optimizer's next step; not for an optimizer whose steps all need the
    closure, nor (`only_if_armed`: after `load_state_dict` / `add_param_group`) for one that
    steps with a closure, whose first closure step closes them (`Collector.disarm`)."""
    coll = opt.collector
    if coll is None or not any(g["params"] for g in opt.param_groups):
        return
    if only_if_armed and not coll.armed:
        return
    sp = plan(opt, arming=True)
    if closure_needs(sp):
        coll.disarm()
        return
    coll.arm(sp.emp, sp.rows_only, sp.warmup_only, sp.grams)


def _first_pass(opt, sp: StepPlan, closure, gb):
    """The closure, with the hooks collecting on its backward."""
    coll = opt.collector
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if coll is not None:
            coll.clear()
            stack.enter_context(coll.collect("backward", sp.emp, True, sp.rows_only,
                                             sp.warmup_only, sp.grams))  # capture=True
        if gb is not None:
            stack.enter_context(gb)
            stack.enter_context(_passes.twice_differentiable_attention())
        loss = closure()
    if gb is not None and gb.grads is None:
        raise RuntimeError(f"{type(opt).__name__} with gr='double_backprop' needs the closure "
                           "to call loss.backward() (the optimizer keeps its graph)")
    return loss


def _refuse_gradients(opt, sp: StepPlan, grads: dict, closure) -> None:
    """Gradients the step cannot use, refused before anything changes: none at all, sparse
    ones, none the hooks collected rows of (`_refuse_uncollected`)."""
    if sp.groups and all(x is None for gs in grads.values() for x in gs):
        raise RuntimeError(f"{type(opt).__name__}.step(): no parameter of this optimizer has a "
                           "gradient (nothing was changed): "
                           + (CLOSURE_HELP if closure is not None else
                              "call loss.backward() before a step() without a closure"))
    _refuse_sparse(opt, sp)
    _refuse_uncollected(opt, sp, closure)


def _refuse_uncollected(opt, sp: StepPlan, closure) -> None:
    """A first step whose closure ran no backward the hooks collect, while the K-FAC
    candidates' weights have gradients: `opt.step(lambda: loss)` after the loop's own
    backward, a closure that forgot `backward()`, a `torch.autograd.grad` of the loss. Every
    layer would go to the diagonal as "not reached by the loss": refused instead."""
    coll = opt.collector
    cands = [li for gp in sp.groups if gp.entry is None for li, _, _ in gp.layers
             if li in sp.emp]  # collected on the closure's backward (not "mc"'s own pass)
    if (closure is None or coll is None or not cands or any(coll.has_rows(li) for li in cands)
            or all(coll.layers[li].weight.grad is None for li in cands)):
        return
    instead = ("after your own backward call opt.step() without a closure instead of "
               "opt.step(lambda: loss)" if not closure_needs(sp) else
               f"{type(opt).__name__} re-evaluates the loss, so opt.step(lambda: loss) after "
               f"your own backward cannot serve ({CLOSURE_HELP})")
    raise RuntimeError(
        f"{type(opt).__name__}.step(closure): the closure's backward reached none of the "
        "model's K-FAC layers, whose weights have gradients (nothing was changed). The "
        f"closure must run the forward and call loss.backward() itself: {instead}; a "
        "torch.autograd.grad of the loss is not collected (call backward())")


def _extra_passes(opt, sp: StepPlan) -> dict[int, torch.Tensor]:
    """Sampled-label pass and per-example gradients: {id(param): per-example gradients}."""
    pe: dict[int, torch.Tensor] = {}
    if not (sp.mc or any(sp.pe.values())):
        return pe
    if not opt.collector.batch.called:
        raise RuntimeError(f"{type(opt).__name__} needs the closure to call the model given to "
                           "the optimizer (its inputs are re-used)")
    y_mc = None
    if sp.mc or sp.pe["mc"]:
        y_mc = _passes.mc_pass(opt, sorted(sp.mc), bool(sp.pe["mc"]))
    for kind, gis in sp.pe.items():
        if gis:
            pe.update(_passes.per_example(opt, gis, y_mc if kind == "mc" else None))
    return pe


def _stats(opt, sp: StepPlan, gp: GroupPlan, layers, pe,
           replicated: bool = False) -> gc.Stats | None:
    r = gp.core.requirements
    if gp.rows_only:
        seen = [L for L in layers if opt.collector.has_rows(L[0])]
        return gc.Stats(layers=layer_stats(opt, seen)) if seen else None
    if not gp.curvature or not (r.layer_stats or r.per_example_grads):
        return None
    if gp.steady is not None and gp.steady[0] is False:  # layers skipping the warm-up: none
        layers = [L for L in layers if opt.collector.warms_now(L[0])]
    # a layer whose forward did not run or whose output took no part in the loss this step
    # (a branch, a multi-task head): its factors are kept (`Stats.absent`); none of them
    # taking part is a closure that ran no backward through the model: `rows` says so
    absent = tuple(w for li, w, _ in layers if not opt.collector.has_rows(li))
    # every rank must refresh the same layers (their collectives pair up): there a layer
    # without rows is the error it always was, unless it is shared by the batch (its input's
    # shape, alike on every rank, says so: `Collector.shared_over_batch`)
    missing = [li for li, w, _ in layers if w in absent and li not in opt.collector.broadcast]
    if missing and replicated and len(absent) < len(layers):
        raise absent_under_collective(opt.collector.layers[missing[0]].label)
    if missing and (len(absent) == len(layers) or replicated):
        collected_rows(opt.collector, missing[0])  # raises
    if absent:
        _describe.warn_if_shared_late(opt, [li for li, w, _ in layers if w in absent])
        layers = [L for L in layers if L[1] not in absent]
    use_pe = gp.index in sp.pe["empirical"] + sp.pe["mc"]
    return gc.Stats(
        per_example_grads=[pe[id(p)] for p in gp.group["params"]] if use_pe else None,
        layers=layer_stats(opt, layers) or None, absent=absent)


def _present(opt, gp: GroupPlan) -> list:
    """The candidate layers whose hooks saw this batch (the first step's K-FAC layers)."""
    coll = opt.collector
    return [(li, w, b) for li, w, b in gp.layers if coll is not None and coll.has_rows(li)]


def _update_groups(opt, sp: StepPlan, grads, env: StepEnv) -> list:
    """[(updates, new GroupState)] of every group: their directions first, then the tail,
    with what reads the whole model summed over the groups (`_whole`)."""
    whole = whole_of(sp, grads)
    env.whole = whole
    if whole is not None:
        env.vectors, env.hvp_cache = vectors(sp, grads), {}
        asked = [rows_of_passes(opt, gp, gp.core, gp.layers, env)
                 for gp in sp.groups if gp.entry is not None]  # a first step's: found later
        env.shared = _passes.SharedPasses({}, {li: n for got in asked if got is not None
                                                  for li, n in got[0].items()})
    prepared = [_group_prepare(opt, sp, gp, grads[gp.index], env) for gp in sp.groups]
    total = None if whole is None else kl_total([p for _, _, p in prepared])
    opt.lr_watch.record_step(sp.groups, prepared, total)
    results = [_finished(core, entry, p, total) for entry, core, p in prepared]
    return results if whole is None else skip_together([p.state for *_, p in prepared], results)


def _group_prepare(opt, sp: StepPlan, gp: GroupPlan, grads, env: StepEnv):
    """(entry, core, `grng_core.optimizer.Pending`) of one group: its direction, reading the
    whole model's gradient where the optimizer has several groups (`_whole`)."""
    params = [p.detach() for p in gp.group["params"]]
    g = [torch.zeros_like(p) if x is None else x.detach() for p, x in zip(params, grads)]
    entry, core, layers = gp.entry, gp.core, gp.layers
    first = entry is None
    if entry is None:
        present = _present(opt, gp) if core.requirements.layer_stats else []
        entry, core = opt.fresh_group_state(gp.index, present)
        layers = opt.match_layers(gp.index, entry.layers) if core.config.structure == "kfac" \
            else []
        gp = GroupPlan(gp.index, gp.group, core, entry, gp.curvature, gp.inverse, layers,
                       gp.offset, steady=gp.steady)
    r = core.requirements
    whole = env.whole
    if whole is not None and whole.grad_sq_norm is not None:  # groups on other devices
        whole = whole._replace(grad_sq_norm=whole.grad_sq_norm.to(params[0].device))
    closure_pass = (env.closure, env.saved_grads, sp.graded, env.rng_before,
                    env.devices, env.outer_autocast, env.snapshot)
    rows_of = rows_of_passes(opt, gp, core, layers, env)
    along = None if whole is None else (sp.all_params, env.vectors, env.shared)
    grad_rows_fn = (_passes.grad_fn(opt, gp.index, *closure_pass, rows_of=rows_of)
                    if rows_of is not None else None)
    oracle = gc.Oracle(
        grad_fn=_passes.grad_fn(opt, gp.index, *closure_pass) if r.grad_fn else None,
        grad_rows_fn=grad_rows_fn,
        hvp_fn=_passes.hvp_fn(opt, gp.index, env.gb, gp.offset, env.collective,
                              None if whole is None else (env.vectors, env.hvp_cache))
        if r.hvp_fn else None,
        along_fn=_passes.grad_fn(opt, gp.index, *closure_pass, rows_of=rows_of, along=along)
        if r.grad_fn and along is not None else None)
    stats = _stats(opt, sp, gp, layers, env.pe, env.collective is not None)
    if first and stats is not None and env.collective is None:
        _describe.warn_if_unexplained(opt, gp.index, core.unexplained(
            g, entry.core, params, _describe.without_padding(opt, gp.index, stats)),
            {j for j, x in enumerate(grads) if x is None})
    pending = core.prepare(g, entry.core, params, stats=stats,
                           oracle=oracle, collective=env.collective,
                           curvature=gp.curvature, inverse=gp.inverse, steady=gp.steady,
                           incidents=opt.incidents(gp.index), whole=whole)
    return entry, core, pending


def _finished(core, entry: GroupState, pending, kl_total):
    """(updates, new GroupState) of one group."""
    if kl_total is not None:
        kl_total = kl_total.to(pending.env.params[0].device)
    updates, new_core = core.finish(pending, kl_total)
    return updates, GroupState(entry.host_step + 1, entry.structure, new_core)


def _apply(opt, sp: StepPlan, grads, results) -> None:
    """θ ← θ + u (parameters without a gradient are left alone, as in torch)."""
    with torch.no_grad():
        for gp, (updates, entry) in zip(sp.groups, results):
            for p, x, u in zip(gp.group["params"], grads[gp.index], updates):
                if x is not None:
                    p.add_(u)
            opt.state[gp.group["params"][0]][STATE_KEY] = entry
            opt.skips.after_step(gp.index, entry.core.skipped)
