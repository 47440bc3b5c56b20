"""The K-FAC rows a step hands the core from its collector or from a shifted pass
(ALGORITHMS.md §2.1 factored form; `_passes.grad_fn`): which groups' passes keep rows, and
their `grng_core.LayerStats`."""

from __future__ import annotations

import torch

import grng_core as gc
from grng_core.requirements import stacked_passes
from grng_torch._layer_rows import joined_inputs, zero_output_rows
from grng_torch._plan import StepEnv


def on_host(gp) -> bool:
    """The group's parameters are CPU tensors: the core can choose the factored form without a
    device-to-host read (`grng_core.concrete.branchable`); on an accelerator it preconditions
    densely, so no rows are kept for it."""
    return all(p.device.type == "cpu" for p in gp.group["params"])


def absent_under_collective(label: str) -> RuntimeError:
    """The error of a K-FAC layer without rows on a step under a collective: every rank must
    refresh the same layers (their statistics are averaged collectively)."""
    return RuntimeError(
        f"K-FAC layer {label!r} took no part in this step's loss under torch.distributed: "
        "every rank must refresh the same layers (their statistics are averaged "
        "collectively), so a layer a step may skip (a branch, a multi-task head, "
        "DistributedDataParallel(find_unused_parameters=True)) cannot be a K-FAC layer. "
        "Put its parameters in a param group with structure='diagonal', or run every "
        "layer on every step (nothing was changed)")


def collected_rows(coll, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(a, s, E) of the collector's layer i, every forward call of the layer concatenated; E
    counts the examples of the model calls (the rows are E·T for a convolution or a
    sequence)."""
    a, s = coll.a.get(i), coll.s.get(i)
    if i in coll.broadcast:
        raise RuntimeError(f"no K-FAC statistics for layer {coll.layers[i].label!r}: it was "
                           f"{coll.broadcast[i]}")
    if not coll.has_rows(i):
        raise RuntimeError(
            f"no K-FAC statistics were collected for layer {coll.layers[i].label!r}: " + (
                "a step() without a closure reads those of your backward since the last "
                "step, and none reached it (a second step() after one backward has none): "
                "call loss.backward() before each step()" if coll.armed else
                "the closure must run the model's forward and call loss.backward() (and "
                "the layer must take part; a torch.autograd.grad of the loss is not "
                "collected: call backward())"))
    assert a is not None and s is not None
    E = coll.scale()
    keep = coll._used_chunks(i)
    if len(keep) < len(a):  # inputs of calls that took no part in the loss
        a = [a[k] for k in keep]
    chunks = []
    for k, a_k in zip(keep, a):  # paired with the inputs, call by call (factored form)
        if k in s:
            rows, f = s[k]  # the backward's rows carry its loss scale: removed here
            chunks.append(rows * (E / coll.loss_scale if f is None else f))
        else:  # that call's output took no part in the loss: its gradient is zero
            chunks.append(zero_output_rows(a_k, coll.layers[i].d_out))
    a_rows = joined_inputs(coll.layers[i], a)
    s_rows = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return a_rows, s_rows, E


def layer_stats(opt, layers, lookup=None) -> list[gc.LayerStats]:
    """LayerStats of `layers` ((hooked layer, weight, bias)) from the collector's rows, or
    from `lookup` (layer -> (a, s, examples) or None: a shifted pass's)."""
    out = []
    for li, w, b in layers:
        got = collected_rows(opt.collector, li) if lookup is None else lookup(li)
        if got is not None:
            a, s, examples = got
            out.append(gc.LayerStats(w, b, a, s, transposed=opt.collector.layers[li].transposed,
                                     batch_size=examples))
    return out


def pass_rows(opt, config, layers):
    """({hooked layer: passes stacked}, stats(lookup): the Stats of the rows a pass left,
    `_passes.grad_fn`) for the shifted passes of a finite-difference ĝ
    (`Oracle.grad_rows_fn`): the `nn.Linear`-type layers, as on the steps that refresh
    nothing (no convolution's unfolded patches); None without any."""
    layers = [L for L in layers if opt.collector.layers[L[0]].kind == "linear"]
    if not layers:
        return None

    def stats(lookup):
        return gc.Stats(layers=layer_stats(opt, layers, lookup) or None)
    return {li: stacked_passes(config) for li, _, _ in layers}, stats


def rows_of_passes(opt, gp, core, layers, env: StepEnv):
    """The group's `pass_rows` where its finite-difference passes give K-FAC rows, else None."""
    r = core.requirements
    if r.grad_fn and r.fd_rows and env.collective is None and on_host(gp):
        return pass_rows(opt, core.config, layers)
    return None


def gram_layers(opt, gp) -> dict:
    """{convolution: state dtype} of a group on a curvature step whose core takes its input
    rows reduced (`Requirements.input_gram`): their patches, k² times the input, are reduced in
    the layer's hook and freed (`_layer_rows.kept_input`; the others keep their rows)."""
    if not gp.core.requirements.input_gram:
        return {}
    convs = [li for li, _, _ in gp.layers if opt.collector.layers[li].kind == "conv"]
    if not convs:
        return {}
    dtype = gp.core.state_dtype([p.detach() for p in gp.group["params"]], torch)
    return dict.fromkeys(convs, dtype)
