"""Elementwise updates of whole factors and leaves in fewer passes where the namespace has the
kernels (§2.1, §3).

The K-FAC refresh touches every d × d factor a few times: the EMA βM + (1−β)M̂ (§2.1) and the
damping shift M + δI; every step combines leaf-sized arrays (RING gauss_newton's
(1 − ρλ)U + ρg, §3.2; momentum, §3). Written as array-API expressions the first two are three
full passes each with a fresh temporary per operation (2.2 ms and 1.0 ms at d = 1025 in
float32 on one CPU core, against 0.3 ms for one pass). torch has the fused kernels
(`torch.lerp`, an in-place add to the diagonal of a fresh copy, `addcmul_` into a fresh
result), imported lazily (no framework import at module level); every other namespace uses
the expressions (XLA fuses them under jit anyway). The values agree to rounding.
"""

from __future__ import annotations

import array_api_compat

from grng_core.tree import device


def ema(old, new, beta, xp):
    """βold + (1−β)new (torch: `lerp(old, new, 1−β)`, old + (1−β)(new − old))."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        weight = 1.0 - beta
        if isinstance(weight, torch.Tensor):
            weight = weight.to(old.dtype)
        return torch.lerp(old, new, weight)
    return beta * old + (1.0 - beta) * new


def add_to_diagonal(M, shift, xp):
    """M + shift·I for a square M (a new array; `shift` a scalar or a 0-d array)."""
    if array_api_compat.is_torch_namespace(xp):
        out = M.clone()
        out.diagonal().add_(shift)
        return out
    return M + shift * xp.eye(M.shape[0], dtype=M.dtype, device=device(M))


def axpby(a, x, b, y, xp):
    """a·x + b·y for arrays x, y of one shape and scalars a, b (Python numbers or 0-d arrays);
    torch: two passes (x·a, then `addcmul_` of b·y into that fresh result) instead of three."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        out = torch.mul(x, a)
        if isinstance(b, torch.Tensor):
            return out.addcmul_(y, b.to(out.dtype))
        return out.add_(y, alpha=b)
    return a * x + b * y
