"""``grng_jax.describe(opt, state, params)``: the torch adapter's report
(`grng_core.describe`), leaves named by their pytree paths; without its list of the layers
that skip the refresh warm-up (torch's hooks see that; here the step decides it in-graph)."""

from __future__ import annotations

import jax

from grng_core.describe import StructureReport, describe_state
from grng_jax._checkpoint import _split, _tagged, core_of
from grng_jax._diagonal_reasons import why_diagonal
from grng_jax._layers import leaf_paths, resolve_layers
from grng_jax._optax import fitting_layers


def _names(params) -> list[str]:
    return ["/".join(str(k) for k in p) or "<root>" for p in leaf_paths(params)]


def report(opt, state, params) -> StructureReport:
    """Which structure and K-FAC layer each params leaf is preconditioned with (by path), the
    share of weight-matrix elements under K-FAC, skipped steps; call it outside jit."""
    grng, _, _ = _split(state, "state")
    core = core_of(opt, grng)
    leaves = jax.tree_util.tree_leaves(params)
    own = grng.core.curvature.diagonal  # one entry per leaf of this optimizer (None: K-FAC)
    if own is not None and len(own) != len(leaves):
        raise ValueError(
            f"describe: this optimizer's state covers {len(own)} leaves, params has "
            f"{len(leaves)}: a state built for another model, or this optimizer runs inside "
            "optax.multi_transform or optax.masked, on part of the model; then pass the params "
            "it sees, the other leaves masked, e.g. "
            "jax.tree.map(lambda p, l: p if l == LABEL else optax.MaskedNode(), params, "
            "labels)")
    paths = leaf_paths(params)
    names = _names(params)
    covered = {i for L in (grng.core.curvature.kfac or ()) for i in L.layout.positions}
    fns = _tagged(opt, set())
    option = getattr(fns[0], "grng_layers", "auto") if fns else "auto"
    main = fns[0].grng_core if fns else core  # before a fallback for having no layer left
    too_large = {i: why for r, why in fitting_layers(main, params, resolve_layers(
        params, option))[1] for i in (r.weight, r.bias) if i is not None} \
        if main.config.structure == "kfac" else {}
    reasons = {i: r for i, (p, x) in enumerate(zip(paths, leaves))
               if i not in covered and (r := why_diagonal(p, x, option))}
    reasons.update({i: why for i, why in too_large.items() if i not in covered})
    layer_names = {L.layout.weight: "/".join(str(k) for k in paths[L.layout.weight][:-1])
                   for L in (grng.core.curvature.kfac or ())}
    return describe_state(core.name, core.config.structure, grng.core,
                          [tuple(x.shape) for x in leaves], names=names,
                          layer_names=layer_names, reasons=reasons, config=core.config)
