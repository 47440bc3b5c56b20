"""`opt.describe()` and the warning when most weight matrices fall to the diagonal.

Names are module paths (`model.named_parameters()`); the reasons come from the layer
registry (`grng_torch.layers`: type not supported, tied, inside MultiheadAttention) and from
the first step (a hooked layer the loss did not reach, or one called on an input the batch
shares).
"""

from __future__ import annotations

import math
import warnings

from grng_core.describe import (
    StructureReport,
    algorithm_label,
    damping_notes,
    describe,
    merge,
    mostly_diagonal,
)
from grng_core.incidents import Incidents
from grng_core.user_frame import user_stacklevel
from grng_torch.layers.registry import owners

NOT_REACHED = "not reached by the loss at the first step (no statistics)"
SLICED = ("applied by slices of the weight on different inputs (nn.MultiheadAttention as "
          "cross-attention: its query rows and key/value rows of in_proj_weight): no one "
          "K-FAC layer")
NO_ROWS = ("called on an input without rows at the first step (no statistics; e.g. an expert "
           "no token was routed to)")
FROZEN = "frozen (requires_grad=False{}) at the first step: no K-FAC statistics for the run"
FROZEN_NOW = "frozen (requires_grad=False{}): no K-FAC statistics if still frozen at the first step"
UNFROZEN = ("frozen (requires_grad=False{}) at the first step, trainable since: no K-FAC "
            "factors, so it trains on the diagonal structure (for K-FAC, leave frozen "
            "parameters out of the optimizer and add them when you unfreeze them: "
            "opt.add_param_group, whose first step picks its K-FAC layers)")


def frozen_reason(layer, stepped: bool) -> str:
    """Why a frozen layer is off K-FAC: after its group's first step, or before it (then it
    is what the first step will do)."""
    what = "" if layer.bias is None else ": weight and bias"
    if stepped and layer.trainable:
        return UNFROZEN.format(what)
    return (FROZEN if stepped else FROZEN_NOW).format(what)


def warn_if_unfrozen(opt) -> None:
    """Once per layer: a layer left off K-FAC because it was frozen at the first step has been
    unfrozen (a fine-tuning schedule); it now trains on the diagonal structure (`UNFROZEN`)."""
    coll = opt.collector
    if coll is None or not coll.frozen:
        return
    thawed = [li for li in coll.frozen if coll.layers[li].trainable and li not in coll.thawed]
    if not thawed:
        return
    coll.thawed.update(thawed)
    names = ", ".join(repr(coll.layers[li].label) for li in sorted(thawed))
    warnings.warn(f"{type(opt).__name__}: layer(s) {names} were {UNFROZEN.format('')}",
                  UserWarning, stacklevel=user_stacklevel())
STALE = "factors kept from before, not refreshed: found "
LOADED = ("on the diagonal in the loaded state: the run that saved it left the layer off "
          "K-FAC at its first step")
CLOSURE_ONLY = ("nn.MultiheadAttention's projections are collected inside step(closure) only; "
                "the first step had no closure")


TIED = "tied: {} hold this one weight (K-FAC from one use would be wrong)"
TIED_LAYER = ("the bias of a layer whose weight is tied (K-FAC takes a layer's weight and bias "
              "together)")


def _reasons_by_param(opt) -> dict[int, str]:
    """id(param) -> why it is not under K-FAC (every module that holds it: a tied weight
    gets one reason naming all its modules, other uses the reason of each)."""
    if opt.collector is None:
        return {}
    by_name = dict(opt.collector.root.named_parameters(remove_duplicate=False))
    out: dict[int, list[str]] = {}
    tied: dict[int, list[str]] = {}
    held = owners(opt.collector.root)  # every module holding each parameter
    for r in opt.collector.registry.records:
        for n in r.params:
            if not r.reason or n not in by_name:
                continue
            path = r.path or type(opt.collector.root).__name__
            if r.reason.startswith("tied:") and len(held.get(id(by_name[n]), ())) > 1:
                tied.setdefault(id(by_name[n]), []).append(path)
                continue
            if r.reason.startswith("tied:"):  # the layer's own bias: only its weight is tied
                r = r._replace(reason=TIED_LAYER)
            why = out.setdefault(id(by_name[n]), [])
            if f"{path}: {r.reason}" not in why:
                why.append(f"{path}: {r.reason}")
    # every module holding a tied weight, not only those that would have been K-FAC layers
    # (BART's embeddings beside its head)
    root = type(opt.collector.root).__name__
    for k in tied:
        names = (path or root for path in held[k].values())
        out.setdefault(k, []).insert(0, TIED.format(", ".join(dict.fromkeys(names))))
    return {k: "; ".join(v) for k, v in out.items()}


def _outside_reasons(opt, i: int) -> dict[int, str]:
    """id(param) -> why a parameter of group i is outside every K-FAC layer of the group: a
    bias whose layer's weight is in another group (the weight keeps K-FAC without a bias
    column), a parameter the model given as `model=` does not hold."""
    if opt.collector is None:
        return {}
    group_of = {id(p): k for k, g in enumerate(opt.param_groups) for p in g["params"]}
    out = {id(p): "not a parameter of the model given to the optimizer (model=)"
           for p in opt.param_groups[i]["params"] if id(p) not in opt.param_names}
    for L in opt.collector.layers:
        k = group_of.get(id(L.weight))
        if L.bias is not None and group_of.get(id(L.bias)) == i and k != i:
            where = "in no param group" if k is None else f"in param group {k}"
            out[id(L.bias)] = (f"the bias of layer {L.label!r}, whose weight is {where}: a K-FAC "
                               "block takes a layer's weight and bias from one group")
        own_bias = getattr(L.module, "bias", None)
        if L.kind == "conv_transpose" and own_bias is not None:
            out[id(own_bias)] = ("the bias of a transposed convolution: added after its windows "
                                 "overlap, it is no column of the layer's per-position map "
                                 "(ALGORITHMS.md §2.1)")
    return out


def _names(opt, i: int) -> list[str]:
    return [opt.param_names.get(id(p), f"group {i} param {j}")
            for j, p in enumerate(opt.param_groups[i]["params"])]


def group_report(opt, i: int) -> StructureReport:
    group = opt.param_groups[i]
    entry = opt.group_state(i)
    names = _names(opt, i)
    kfac = group["structure"] == "kfac"
    candidates = opt.layer_candidates(i) if kfac else []
    if entry is None:
        pairs = [(w, b) for li, w, b in opt.fitting_layers(i, candidates)
                 if opt.collector.layers[li].trainable]
        reasons_frozen = {j: frozen_reason(opt.collector.layers[li], False)
                          for li, w, b in candidates
                          if not opt.collector.layers[li].trainable
                          for j in (w, b) if j is not None}
    else:
        pairs = [(w, b) for w, b in entry.layers]
        reasons_frozen = {}
    why = {**_outside_reasons(opt, i), **_reasons_by_param(opt)}
    reasons = {j: why[id(p)] for j, p in enumerate(group["params"]) if id(p) in why}
    reasons.update(reasons_frozen)
    if entry is not None:
        used = {w for w, _ in pairs}
        for li, w, b in candidates:
            if w not in used:
                reason = opt.collector.oversized.get(li) or opt.collector.broadcast.get(li) or (
                    frozen_reason(opt.collector.layers[li], True)
                    if li in opt.collector.frozen else
                    CLOSURE_ONLY if opt.collector.layers[li].functional
                    and opt.collector.armed and i not in opt.loaded_groups else
                    LOADED if i in opt.loaded_groups else
                    NO_ROWS if li in opt.collector.empty else
                    SLICED if li in opt.collector.sliced else NOT_REACHED)
                reasons.update({j: reason for j in (w, b) if j is not None})
    if entry is None:
        reasons.update({j: opt.collector.oversized[li] for li, w, b in candidates
                        if li in opt.collector.oversized for j in (w, b) if j is not None})
    layer_names = {w: opt.collector.layers[li].label for li, w, _ in candidates}
    stale = {j: STALE + opt.collector.broadcast[li] for li, w, b in candidates
             if li in opt.collector.broadcast and (w, b) in pairs
             for j in (w, b) if j is not None}
    return describe(algorithm_label(opt.algorithm, group.get("form")), group["structure"],
                    [tuple(p.shape) for p in group["params"]], pairs, names, layer_names,
                    reasons, opt.incidents(i).entries(),
                    None if entry is None else int(entry.core.skipped),
                    [layer_names[w] for li, w, _ in candidates
                     if opt.collector is not None and li in opt.collector.no_warmup],
                    notes=stale if entry is None else
                    {**damping_notes(entry.core, opt.core(i).config), **stale},
                    frozen={j for j, p in enumerate(group["params"]) if not p.requires_grad})


def report(opt) -> StructureReport:
    return merge([group_report(opt, i) for i in range(len(opt.param_groups))
                  if opt.param_groups[i]["params"]])


def incidents_for(opt, i: int) -> Incidents:
    """Group i's extra-damping log, naming layers by module path."""
    log = opt._incidents.get(i)
    if log is None:
        names = _names(opt, i)
        paths = {w: opt.collector.layers[li].label for li, w, _ in opt.layer_candidates(i)}
        log = Incidents(name_of=lambda w: repr(paths.get(w, names[w])))
        opt._incidents[i] = log
    return log


def warn_if_split_layers(opt) -> None:
    """Warn once when layers' biases are in another param group than their weights (the
    weight-decay recipe's split): those biases go to the diagonal, the weights keep K-FAC
    without a bias column, and the steps differ from one group's (README "Param groups split
    nothing")."""
    if getattr(opt, "_warned_split", False) or opt.collector is None:
        return
    groups = opt.param_groups
    group_of = {id(p): k for k, g in enumerate(groups) for p in g["params"]}

    def kfac_group(p):
        k = group_of.get(id(p))
        return k if k is not None and p.requires_grad and groups[k]["structure"] == "kfac" \
            else None
    split = [L.label for L in opt.collector.layers if L.bias is not None
             and None not in (kfac_group(L.weight), kfac_group(L.bias))
             and kfac_group(L.weight) != kfac_group(L.bias)]
    if not split:
        return
    opt._warned_split = True
    warnings.warn(
        f"{type(opt).__name__}: the biases of {len(split)} K-FAC layers (e.g. layer "
        f"{split[0]!r}) "
        "are in another param group than their weights (as the weight-decay recipe splits "
        "them): those biases use the diagonal structure and the weights K-FAC without a bias "
        "column, which changes the steps. To keep them under K-FAC, give each layer's weight "
        "and bias one group (README \"Param groups split nothing\"; opt.describe() lists every "
        "parameter).", UserWarning, stacklevel=user_stacklevel())


def warn_if_oversized(opt) -> None:
    """Warn once when layers were left to the diagonal for a factor over `max_factor_dim`."""
    coll = opt.collector
    if getattr(opt, "_warned_oversized", False) or coll is None or not coll.oversized:
        return
    opt._warned_oversized = True
    shown = "; ".join(f"{coll.layers[li].label!r}: {why}" for li, why in coll.oversized.items())
    warnings.warn(f"{type(opt).__name__}: the diagonal structure, not K-FAC, preconditions "
                  f"{len(coll.oversized)} layer(s) whose factors are too large: {shown} "
                  "(ALGORITHMS.md §2.1; opt.describe() lists every parameter).",
                  UserWarning, stacklevel=user_stacklevel())


def warn_if_mostly_diagonal(opt) -> None:
    """Warn once when most weight matrices of the "kfac" groups are on the diagonal; else,
    once, when a K-FAC layer the loss did not reach at the first step was put on it (a head
    or branch left out of that step: the diagonal is kept for the whole run)."""
    warn_if_split_layers(opt)
    warn_if_oversized(opt)
    if opt._warned_diagonal or opt.collector is None:
        return
    reports = [group_report(opt, i) for i, g in enumerate(opt.param_groups)
               if g["params"] and g["structure"] == "kfac"]
    matrices = [e for r in reports for e in r.matrices() if e.counted
                and not (e.reason or "").startswith("frozen")]
    off = [e for e in matrices if e.structure != "kfac"]
    share = mostly_diagonal([math.prod(e.shape) for e in matrices if e.structure == "kfac"],
                            [math.prod(e.shape) for e in off])
    if share is None:
        missed = [f"{e.name} ({e.reason})" for e in off if e.reason in (NOT_REACHED,
                                                                           CLOSURE_ONLY)]
        if missed:
            opt._warned_diagonal = True
            warnings.warn(
                f"{type(opt).__name__}: the diagonal structure, not K-FAC, preconditions "
                f"{'; '.join(missed)} for the whole run. Take the first step with every head "
                "or branch in play to have them on K-FAC (opt.describe() lists every "
                "parameter).", UserWarning, stacklevel=user_stacklevel())
        return
    opt._warned_diagonal = True
    coll = opt.collector
    over = {opt.param_names.get(id(t)) for li in coll.oversized
            for t in (coll.layers[li].weight, coll.layers[li].bias) if t is not None}
    if all(e.name in over for e in off):
        return  # `warn_if_oversized` named them all
    shown = "; ".join(f"{e.name} ({e.reason or 'no K-FAC layer'})" for e in off[:6])
    more = f"; and {len(off) - 6} more" if len(off) > 6 else ""
    warnings.warn(
        f"{type(opt).__name__}: {len(off)} of {len(matrices)} weight matrices, holding "
        f"{share:.0%} of all weight-matrix elements, are on the diagonal structure, not K-FAC: "
        f"{shown}{more}. "
        "opt.describe() lists every parameter.", UserWarning, stacklevel=user_stacklevel())


FROZEN_WARN_ELEMENTS = 1_000_000  # below this, frozen parameters' state is not worth a warning


def warn_if_mostly_frozen(opt) -> None:
    """Warn once, at construction, when most parameter elements given are frozen
    (requires_grad=False) and they number at least `FROZEN_WARN_ELEMENTS`: GRNG keeps state
    for every parameter it is given (a frozen one can be unfrozen later and train on the
    diagonal) where torch.optim keeps none, so LoRA on a large model given
    `model.parameters()` would pay a second copy of the base model (or more) for nothing."""
    params = [p for g in opt.param_groups for p in g["params"]]
    frozen = [p for p in params if not p.requires_grad]
    n_frozen = sum(p.numel() for p in frozen)
    n_all = sum(p.numel() for p in params)
    if n_frozen < FROZEN_WARN_ELEMENTS or 2 * n_frozen < n_all:
        return
    # the diagonal's moment, and the momentum buffer where the group has momentum
    size = sum(p.numel() * max(4, p.element_size()) * (2 if g.get("momentum") else 1)
               for g in opt.param_groups for p in g["params"] if not p.requires_grad)
    warnings.warn(
        f"{type(opt).__name__}: {n_frozen:,} of the {n_all:,} parameter elements given "
        f"({n_frozen / n_all:.0%}, {len(frozen)} tensors) are frozen (requires_grad=False). "
        f"They are never updated but still get optimizer state (about {size / 2**30:.2f} GiB) "
        "and a zero gradient every step, where torch.optim keeps nothing for them. Pass the "
        "trainable parameters only: "
        f"{type(opt).__name__}([p for p in model.parameters() if p.requires_grad], "
        "model=model, ...).", UserWarning, stacklevel=user_stacklevel())


def warn_if_shared_late(opt, absent: list[int]) -> None:
    """Warn once per layer when a K-FAC layer (hooked layer numbers `absent`: no rows this
    step) is found called on an input the batch shares after its first step (that step's calls
    had one example each, or did not share it): its factors are kept, not refreshed again."""
    coll = opt.collector
    for li in absent:
        if li in coll.broadcast and li not in coll.broadcast_warned:
            coll.broadcast_warned.add(li)
            warnings.warn(
                f"{type(opt).__name__}: K-FAC layer {coll.layers[li].label!r} was "
                f"{coll.broadcast[li]}. It took K-FAC at the first step, so its factors are now "
                "kept as they are, no longer refreshed. Take the first step with the batches "
                "you train with to leave it to the diagonal structure.", UserWarning,
                stacklevel=user_stacklevel())


def without_padding(opt, i: int, stats):
    """`stats` with the rows of an embedding's `padding_idx` tokens dropped, for the
    first-step gradient check: torch gives that table row no gradient, so the other rows'
    product is what the gradient holds (the statistics themselves keep every row)."""
    pads = {w: pad for li, w, _ in opt.layer_candidates(i)
            if (pad := getattr(opt.collector.layers[li].module, "padding_idx", None)) is not None}
    if not pads or not stats.layers:
        return stats
    out = []
    for ls in stats.layers:
        if ls.weight in pads:
            ids = ls.inputs.reshape(-1)
            keep = ids != pads[ls.weight]
            ls = ls._replace(inputs=ids[keep],
                             output_grads=ls.output_grads.reshape(ids.shape[0], -1)[keep])
        out.append(ls)
    return stats._replace(layers=out)


def warn_if_unexplained(opt, i: int, weights: list, no_grad: set) -> None:
    """Warn at the first step for the K-FAC layers of group i whose gradient their own calls'
    rows do not explain (`grng_core.Optimizer.unexplained`; weight positions `weights`), but
    not for a layer with a leaf without a gradient (`no_grad`: a frozen weight whose bias
    trains has a zero gradient there, not its rows' product)."""
    found = opt.layer_candidates(i)
    frozen = {w for li, w, b in found if w in no_grad or b in no_grad}
    weights = [w for w in weights if w not in frozen]
    if not weights:
        return
    paths = {w: opt.collector.layers[li].label for li, w, _ in found}
    shown = ", ".join(repr(paths.get(w, w)) for w in weights)
    warnings.warn(
        f"{type(opt).__name__}: the first step's gradient of K-FAC layer(s) {shown} is not the "
        "product of the layer's own calls' statistics, c·sᵀa/B + α·W + β·b (ALGORITHMS.md "
        "§2.1): "
        "its weight is used outside the layer (a functional tie such as h @ emb.weight.T or "
        "F.linear(h, emb.weight)), or its .grad was edited per element (clip_grad_value_, "
        "zeroed rows). K-FAC's factors see only the layer's calls: put a weight used elsewhere "
        "in a param group with structure='diagonal' (checked at the first step only).",
        UserWarning, stacklevel=user_stacklevel())
