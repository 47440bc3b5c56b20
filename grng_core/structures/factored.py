"""Factored K-FAC preconditioning (ALGORITHMS.md §2.1, "Factored preconditioning").

When a layer's gradient is the product of its batch rows, G = c·sᵀa/B, the preconditioned
gradient is U = c·(S_λ⁻¹sᵀ)(a A_λ⁻¹)/B: n(d_out² + d_in'² + d_out·d_in') multiply-adds
instead of d_out·d_in'(d_out + d_in'). Whether it is used is decided from shapes alone
(`cheaper`), and whether G is that product (up to the scalar c that global clipping or a loss
scale introduce) by a check on two fixed probe vectors, O((d_out + n)·d_in') work: G's probes
must match c times the rows' within `tolerance` (well above rounding, far below a real
difference such as an L2 term, a tied weight's other use, per-element clipping, or
mis-paired accumulated rows). A gradient that fails it is preconditioned densely.
"""

from __future__ import annotations

import math

from grng_core.structures import blocks
from grng_core.structures.blocks import Product
from grng_core.structures.rows import LayerRows

N_PROBES = 2


def cheaper(d_out: int, d_in: int, n: int) -> bool:
    """True when the factored form costs fewer multiply-adds than the dense one (§2.1)."""
    return n * (d_out * d_out + d_in * d_in + d_out * d_in) < d_out * d_in * (d_out + d_in)


def tolerance(dtype, xp) -> float:
    """√eps of the rows' dtype: 3.5e-4 in float32, 1.5e-8 in float64."""
    return math.sqrt(float(xp.finfo(dtype).eps))


def probes(d: int, xp, dtype, device):
    """(2 × d) fixed, well-spread probe vectors (one per row): cos of incommensurate multiples
    of the index (deterministic, so every backend and every run checks the same directions)."""
    j = xp.astype(xp.arange(1, d + 1, device=device), dtype)
    return xp.stack([xp.cos(j * 2.3999632297286535), xp.cos(j * 1.0471975511965976 + 0.5)])


def product_scale(GP, P, r: LayerRows, xp):
    """(c, ok): the least-squares scalar with G·Pᵀ ≈ c·(sᵀ(aPᵀ))/B on the probes P (2 × d_in'),
    given GP = (G·Pᵀ)ᵀ (2 × d_out, `blocks.grad_probes`), and whether the residual is within
    `tolerance`·‖G·Pᵀ‖ (a 0-d bool array; float32's where the rows arrived in float32 for a
    wider state, `LayerRows.tol`). Every product has the two probes as its left operand
    ((P aᵀ) s, not sᵀ(a Pᵀ)): the same numbers, and BLAS runs a 2-row product several times
    faster than a 2-column one (0.04 against 0.53 ms at n = 128, d_out = 1024, MKL)."""
    PU = ((P @ xp.matrix_transpose(r.a)) @ r.s) / r.batch
    pp = xp.sum(PU * PU)
    c = xp.sum(GP * PU) / xp.where(pp > 0, pp, xp.ones_like(pp))
    res = GP - c * PU
    tol = max(tolerance(GP.dtype, xp), r.tol)
    ok = xp.sum(res * res) <= (tol * tol) * xp.sum(GP * GP)
    return c, ok


def apply(r: LayerRows, S_inv, A_inv, c, L, xp) -> Product:
    """c·(S⁻¹sᵀ)(aA⁻¹)/B by blocks (the scalar applied to the small d_out × n factor)."""
    left = (c / r.batch) * (S_inv @ xp.matrix_transpose(r.s))
    return blocks.product(r.a, A_inv, L).premultiply(left)


def stack(parts: list[LayerRows], coefs, xp) -> LayerRows:
    """The rows of Σᵢ cᵢ·sᵢᵀaᵢ/B as one LayerRows: [c₁a₁; c₂a₂; ...] and [s₁; s₂; ...] (a
    finite-difference ĝ's passes, §1 and §2.1)."""
    a = xp.concat([c * r.a for c, r in zip(coefs, parts)], axis=0)
    s = xp.concat([r.s for r in parts], axis=0)
    return LayerRows(a, s, parts[0].batch, max(r.tol for r in parts))
