"""Typed optimizer state: NamedTuples of arrays, as in optax (ALGORITHMS.md §2, §3.3, §4).

    OptState(step, skipped, curvature_count, momentum, curvature)
      curvature: Preconditioner (RENG, RING) or Belief (R-Kalman)
        diagonal: one array per params leaf (None where K-FAC covers the leaf), or None
        kfac: one KfacLayer per registered layer, or None when the structure is not kfac

A K-FAC layer's layout (which leaves, their orientation and sizes) is the `LayerLayout` field of
its `KfacLayer`: a frozen, hashable record that pytree libraries treat as static (JAX:
`register_static`, done by `ensure_pytrees`), so the state alone describes itself and still
traces under jit. `grng_core.codec` turns any state into the portable checkpoint tree and back.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

Array = Any


@dataclass(frozen=True)
class LayerLayout:
    """A K-FAC layer resolved to leaf positions and matrix sizes (§2.1).

    weight / bias: positions of the leaves in the flat params (bias None when absent).
    transposed: True when the weight is stored (d_in, d_out) as in JAX/Flax.
    a_diagonal: an embedding (one-hot inputs): A is diag(token frequencies), kept as a
        vector (d_in,), and its damped inverse is elementwise (§2.1); no bias.
    d_out, d_in: the weight's matrix sizes (d_in without the bias column).
    """

    weight: int
    bias: int | None
    transposed: bool
    d_out: int
    d_in: int
    a_diagonal: bool = False

    @property
    def d_in_ext(self) -> int:
        """d_in plus the bias column."""
        return self.d_in + (self.bias is not None)

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


class KfacLayer(NamedTuple):
    """One layer's factors: EMAs A, S (R-Kalman: damped factors) and the inverses of their
    damped forms (R-Kalman: P_A, P_S); trace_A / trace_S only for the R-Kalman belief.
    With a damping that changes every step and `inverse_method` "eigh" (RING
    form="adaptive_damping", §3.2) the inverses are None and the layer keeps the factors'
    eigendecompositions instead: A = A_vecs diag(A_vals) A_vecsᵀ, likewise for S."""

    layout: LayerLayout
    A: Array
    S: Array
    A_inv: Array | None
    S_inv: Array | None
    trace_A: Array | None = None
    trace_S: Array | None = None
    A_vecs: Array | None = None
    A_vals: Array | None = None
    S_vecs: Array | None = None
    S_vals: Array | None = None


class Preconditioner(NamedTuple):
    """RENG / RING curvature (§2): diagonal second moments v and K-FAC layers."""

    diagonal: tuple | None
    kfac: tuple[KfacLayer, ...] | None


class Belief(NamedTuple):
    """R-Kalman belief (§3.3): diagonal variances p and Kronecker layers (P_S ⊗ P_A)."""

    diagonal: tuple | None
    kfac: tuple[KfacLayer, ...] | None


class OptState(NamedTuple):
    """The whole state of a grng_core optimizer.

    step: steps taken (int32; skipped steps do not count); skipped: steps skipped as
    non-finite; curvature_count: curvature updates so far (the diagonal's bias correction);
    momentum: one buffer per leaf, or None while momentum is 0.
    """

    step: Array
    skipped: Array
    curvature_count: Array
    momentum: tuple | None
    curvature: Preconditioner | Belief


def host_step(state: OptState) -> int:
    """The calls made so far (taken + skipped steps), as a Python int: what a host-side
    schedule counts (reads two scalars; for adapters between steps, never inside one)."""
    return int(state.step) + int(state.skipped)


def kfac_layers(state: OptState) -> tuple[KfacLayer, ...]:
    return state.curvature.kfac or ()


def layouts(state: OptState) -> tuple[LayerLayout, ...]:
    return tuple(layer.layout for layer in kfac_layers(state))


_REGISTERED = False


def ensure_pytrees() -> None:
    """Tell JAX (when it is imported) that `LayerLayout` is static pytree metadata."""
    global _REGISTERED
    if _REGISTERED or "jax" not in sys.modules:
        return
    import jax  # only when the caller already uses jax

    jax.tree_util.register_static(LayerLayout)
    _REGISTERED = True


def arrays(tree) -> list:
    """Every array of a state (depth first; None and layouts skipped)."""
    if isinstance(tree, LayerLayout) or tree is None:
        return []
    if isinstance(tree, (tuple, list)):
        return [x for v in tree for x in arrays(v)]
    return [tree]


def map_arrays(fn, a, b):
    """fn over matching arrays of two states of the same layout (layouts and None kept)."""
    if isinstance(a, LayerLayout) or a is None:
        return a
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*(map_arrays(fn, x, y) for x, y in zip(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a)(map_arrays(fn, x, y) for x, y in zip(a, b))
    return fn(a, b)


def changed_arrays(new, old) -> list:
    """Arrays of `new` that are not the very objects of `old` (the ones this step computed;
    the others were checked when they were made)."""
    if new is old or isinstance(new, LayerLayout) or new is None:
        return []  # an untouched subtree (a layer this step did not refresh) holds nothing new
    if isinstance(new, (tuple, list)):
        olds = old if isinstance(old, (tuple, list)) and len(old) == len(new) else [None] * len(new)
        return [x for v, o in zip(new, olds) for x in changed_arrays(v, o)]
    return [] if new is old else [new]
