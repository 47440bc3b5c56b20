"""Why a weight matrix is not a K-FAC layer in grng_jax, and the one-time warning at init when
most of them are not (`grng_jax.describe` shows the same reasons per leaf)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax

from grng_core.describe import mostly_diagonal
from grng_core.user_frame import user_stacklevel
from grng_jax._layers import is_weight_matrix, leaf_paths

_AUTO = ("layers='auto' registers flax.linen / flax.nnx kernels (named 'kernel', input axes "
         "first), Embed tables (named 'embedding') and equinox weights (named 'weight', output "
         "axis first) that have a 'bias'")


def why_diagonal(path: tuple, leaf, layers_option) -> str | None:
    """Why a weight matrix (`is_weight_matrix`) is not a K-FAC layer, or None for any other
    leaf."""
    if not is_weight_matrix(path, leaf):
        return None
    if layers_option is None:
        return "layers=None"
    found = getattr(layers_option, "reasons", None) or {}  # grng_jax.find_layers' list
    if tuple(path) in found:
        return found[tuple(path)]
    last = str(path[-1]) if path else ""
    if last == "weight":
        return ("named 'weight' without a 'bias' of its first axis's size (layers='auto' takes "
                "equinox weights that have one): a bias-less eqx.nn.Linear / Conv takes K-FAC "
                "with layers=grng_jax.find_layers(loss_fn, params, batch); an "
                "eqx.nn.Embedding table stays diagonal (its calls are not hooked)")
    if layers_option == "auto":
        return (f"not a layer by name: {_AUTO}; a weight the loss calls through a covered "
                "layer under another name is found by layers=grng_jax.find_layers(...)")
    return "not in the layers= given"


def warn_if_mostly_diagonal(name: str, params, covered: set, option,
                            oversized: Sequence = ()) -> None:
    """At init of a kfac optimizer: warn when most ≥ 2-axis leaves are not K-FAC layers
    (`oversized`: [(LayerRef, why)] of the layers over `max_factor_dim`)."""
    known = {r.weight: why for r, why in oversized}
    leaves = jax.tree_util.tree_leaves(params)
    paths = leaf_paths(params)
    matrices = [i for i, x in enumerate(leaves) if is_weight_matrix(paths[i], x)]
    if not matrices and not covered and sum(math.prod(getattr(x, "shape", ())) for x in leaves) \
            >= 1024:
        warnings.warn(
            f"grng_jax.{name} with structure='kfac': params have no weight matrix, only "
            f"vectors and scalars ({len(leaves)} leaf or leaves: flattened, as under "
            "optax.flatten?), "
            "so no layer can take K-FAC and every leaf runs the fallback structure. Give "
            "the optimizer the model's own pytree (optax.flatten is not needed), or choose "
            "structure='diagonal' to say so.", UserWarning, stacklevel=user_stacklevel())
        return
    off = [i for i in matrices if i not in covered]
    share = mostly_diagonal([math.prod(leaves[i].shape) for i in matrices if i in covered],
                            [math.prod(leaves[i].shape) for i in off])
    if share is None or set(off) <= set(known):  # `warn_if_oversized` named them all
        return
    by_reason: dict[str, list[str]] = {}  # each reason once, with the leaves it explains
    for i in off:
        why = known.get(i) or why_diagonal(paths[i], leaves[i], option) or ""
        by_reason.setdefault(why, []).append("/".join(str(k) for k in paths[i]))
    shown = "; ".join(", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4
                                              else "") + f" ({why})"
                      for why, names in list(by_reason.items())[:4])
    more = f"; and {len(by_reason) - 4} more reasons" if len(by_reason) > 4 else ""
    warnings.warn(
        f"grng_jax.{name}: {len(off)} of {len(matrices)} weight matrices, holding {share:.0%} "
        f"of all weight-matrix elements, are on the diagonal structure, not K-FAC: "
        f"{shown}{more}. "
        "grng_jax.describe(opt, state, params) lists every leaf.", UserWarning,
        stacklevel=user_stacklevel())


def warn_if_oversized(name: str, params, oversized: list) -> None:
    """At init of a kfac optimizer: warn when layers were left to the diagonal for a factor
    over `max_factor_dim` ([(LayerRef, the core's reason)]; ALGORITHMS.md §2.1)."""
    if not oversized:
        return
    paths = leaf_paths(params)
    shown = "; ".join(f"{'/'.join(str(k) for k in paths[r.weight])}: {why}"
                      for r, why in oversized)
    warnings.warn(
        f"grng_jax.{name}: the diagonal structure, not K-FAC, preconditions {len(oversized)} "
        f"layer(s) whose factors are too large: {shown} (ALGORITHMS.md §2.1; "
        "grng_jax.describe(opt, state, params) lists every leaf).", UserWarning,
        stacklevel=user_stacklevel())
