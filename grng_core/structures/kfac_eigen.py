"""K-FAC in the factors' eigenbases, for a damping that changes every step (ALGORITHMS.md
§2.1 "eigh", §3.2 form "adaptive_damping").

Every `inverse_every` steps the EMA factors are decomposed, A = Q_A diag(e_A) Q_Aᵀ and
S = Q_S diag(e_S) Q_Sᵀ (eigenvalues clipped at 0: the factors are positive semidefinite).
On every step, with the damping c of that step split by π (π from tr A = Σ e_A, tr S = Σ e_S),
δ_A = π√c and δ_S = √c/π, the damped inverses are exact with no new factorisation:
    S_δ⁻¹ G A_δ⁻¹ = Q_S [(Q_Sᵀ G Q_A) / ((e_S + δ_S)(e_A + δ_A)ᵀ)] Q_Aᵀ,
and in factored form (G = c'·sᵀa/B): (c'/B)·Q_S((Q_Sᵀsᵀ)/(e_S + δ_S)) · ((aQ_A)/(e_A + δ_A))Q_Aᵀ.
"""

from __future__ import annotations

from grng_core.context import select
from grng_core.linalg import eigh
from grng_core.structures import blocks, kfac
from grng_core.structures.blocks import Blocks, Product
from grng_core.structures.kfac import pi_split
from grng_core.tree import device


def _eigh(M, xp, name):
    """(e ≥ 0, Q) of a symmetric PSD factor (rounding's negative eigenvalues clipped)."""
    e, Q = eigh(M, xp, name)
    return xp.maximum(e, xp.zeros_like(e)), Q


def decompose(layers, ctx, keys, which) -> tuple:
    """Eigendecompositions of every layer's EMA factors, selected on the layer's inverse flag
    (`which`, one per layer)."""
    xp = ctx.xp
    new = []
    for layer, inverse in zip(layers, which):
        if inverse is False:
            new.append(layer)
            continue
        name = f"layer {keys[layer.layout.weight]!r}"
        if layer.A.ndim == 1:  # an embedding's diagonal A is its own eigendecomposition
            e_A, Q_A = xp.maximum(layer.A, xp.zeros_like(layer.A)), None
        else:
            e_A, Q_A = _eigh(layer.A, xp, f"A of {name}")
        e_S, Q_S = _eigh(layer.S, xp, f"S of {name}")
        new.append(layer._replace(
            A_vecs=None if Q_A is None else select(inverse, Q_A, layer.A_vecs, xp),
            A_vals=select(inverse, e_A, layer.A_vals, xp),
            S_vecs=select(inverse, Q_S, layer.S_vecs, xp),
            S_vals=select(inverse, e_S, layer.S_vals, xp)))
    return tuple(new)


def shifts(layer, damping, xp):
    """(δ_A, δ_S) = (π√c, √c/π) with π from the decomposed factors' traces (§2.1)."""
    pi = pi_split(xp.sum(layer.A_vals), layer.A_vals.shape[0], xp.sum(layer.S_vals),
                  layer.S_vals.shape[0], xp)
    root = xp.sqrt(xp.asarray(damping, dtype=layer.A_vals.dtype, device=device(layer.A_vals)))
    return pi * root, root / pi


def _dense(layer, leaves, damping, xp) -> Product:
    dA, dS = shifts(layer, damping, xp)
    QA, QS, L = layer.A_vecs, layer.S_vecs, layer.layout
    inner = blocks.left_multiply(xp.matrix_transpose(QS), L, leaves, xp)
    if QA is not None:
        inner = inner @ QA
    scale = (layer.S_vals + dS)[:, None] * (layer.A_vals + dA)[None, :]
    out = QS @ (inner / scale)
    return Blocks(out) if QA is None else blocks.product(out, xp.matrix_transpose(QA), L)


def _factored(layer, r, c, damping, xp) -> Product:
    dA, dS = shifts(layer, damping, xp)
    QA, QS = layer.A_vecs, layer.S_vecs
    left = QS @ ((xp.matrix_transpose(QS) @ xp.matrix_transpose(r.s))
                 * ((c / r.batch) / (layer.S_vals + dS))[:, None])
    right = (r.a @ QA) / (layer.A_vals + dA)[None, :]
    return blocks.product(right, xp.matrix_transpose(QA), layer.layout).premultiply(left)


def precondition(layers, leaves, damping, xp, rows_of=None) -> dict:
    """U = S_δ⁻¹ G A_δ⁻¹ for the damping of this step (`kfac.precondition` with the products
    in the eigenbases): {position: preconditioned leaf}."""
    return kfac.precondition(
        layers, leaves, xp, rows_of,
        dense=lambda layer, lv: _dense(layer, lv, damping, xp),
        factored_form=lambda layer, r, c: _factored(layer, r, c, damping, xp))
