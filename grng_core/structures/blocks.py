"""A K-FAC layer's d_out × d_in' matrices by blocks: the weight's d_out × d_in block and the bias
column (§2.1: G = [W | b], the bias as the last input column, d_in' = d_in + 1).

Products whose output has the layer's d_in' columns are computed per block (`cols`,
`left_multiply`): each leaf comes out contiguous (no strided slice of a d_out × d_in' U), and
BLAS runs at the weight's own width rather than the odd d_in + 1: S⁻¹G for the benchmark MLP's
first layer (d_out = 1024, d_in = 784) took 20.3 ms with 785 output columns against 17.3 ms
with 784 plus a matrix-vector product (one core, MKL), G A⁻¹ 16.5 against 13.5 ms.

Under JAX tracing (jit, vmap) the products stay joined (`Joined`: one product with the d_in'
columns, split into leaves at the end): XLA lays the program out itself, so blocks gain nothing
there, and with them XLA:CPU's runtime wedged (0% CPU, for ever) on jit(vmap) of R-Kalman's step
over 8 seeds (tests/jax/test_vmap_seeds.py), deterministically. One place for that choice:
`_by_blocks`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from grng_core.concrete import is_traced
from grng_core.state import LayerLayout


class Blocks(NamedTuple):
    """The weight block (d_out × d_in, or n × d_in for a right factor) and the bias column
    ((d_out,) or (n,); None for a layer without bias)."""

    weight: Any
    bias: Any = None

    def premultiply(self, X) -> Blocks:
        """The blocks of X·[W | b]."""
        return Blocks(X @ self.weight, None if self.bias is None else X @ self.bias)


class Joined(NamedTuple):
    """A d_out × d_in' matrix kept whole (the traced form, see the module's docstring)."""

    matrix: Any

    def premultiply(self, X) -> Joined:
        return Joined(X @ self.matrix)


Product = Blocks | Joined  # a layer's d_out × d_in' result, by blocks or joined


def _by_blocks(*arrays) -> bool:
    """Products by blocks on eager arrays; joined under JAX tracing (module docstring)."""
    return not any(is_traced(x) for x in arrays if x is not None)


def weight_block(L: LayerLayout, leaves, xp):
    """The weight leaf as its d_out × d_in block (a view where the layout allows)."""
    W = leaves[L.weight]
    if L.transposed:
        return xp.matrix_transpose(xp.reshape(W, (L.d_in, L.d_out)))
    return xp.reshape(W, (L.d_out, L.d_in))


def bias_column(L: LayerLayout, leaves, xp):
    return None if L.bias is None else xp.reshape(leaves[L.bias], (L.d_out,))


def left_multiply(X, L: LayerLayout, leaves, xp):
    """X·G (rows of X × d_in') as [X·W | X·b]: the large product at the weight's width."""
    W = weight_block(L, leaves, xp)
    if L.bias is None:
        return X @ W
    b = bias_column(L, leaves, xp)
    if not _by_blocks(X, W):
        return X @ xp.concat([W, b[:, None]], axis=1)
    return xp.concat([X @ W, (X @ b)[:, None]], axis=1)


def cols(Y, L: LayerLayout) -> Blocks:
    """The blocks of a matrix Y with d_in' columns (a right factor such as A⁻¹ or a·A⁻¹)."""
    if L.bias is None:
        return Blocks(Y)
    return Blocks(Y[:, : L.d_in], Y[:, L.d_in])


def product(X, Y, L: LayerLayout) -> Product:
    """The blocks of X·Y for Y with d_in' columns, each its own product (joined when traced)."""
    return cols(Y, L).premultiply(X) if _by_blocks(X, Y) else Joined(X @ Y)


def grad_probes(L: LayerLayout, leaves, P, xp):
    """(G·Pᵀ)ᵀ = P·Gᵀ (k × d_out) for probes P (k × d_in') straight from the leaves, without
    assembling G (a copy of the weight with the bias column appended)."""
    parts = probe_parts(L, leaves, P, xp)
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]  # (no 0 + on the hot path)


def probe_parts(L: LayerLayout, leaves, P, xp) -> list:
    """`grad_probes`' terms: the weight block's, and the bias column's where there is one."""
    out = [P[:, : L.d_in] @ xp.matrix_transpose(weight_block(L, leaves, xp))]
    if L.bias is not None:
        out.append(P[:, L.d_in:] * xp.reshape(leaves[L.bias], (1, L.d_out)))
    return out


def to_leaves(L: LayerLayout, U: Product, shapes, xp) -> dict:
    """Leaves {position: array} from the blocks of U, in the leaves' own layout."""
    if isinstance(U, Joined):
        U = cols(U.matrix, L)
    W = xp.matrix_transpose(U.weight) if L.transposed else U.weight
    out = {L.weight: xp.reshape(W, shapes[L.weight])}
    if L.bias is not None:
        out[L.bias] = xp.reshape(U.bias, shapes[L.bias])
    return out
