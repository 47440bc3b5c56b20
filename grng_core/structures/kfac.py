"""K-FAC: Kronecker factors of dense and convolution layers (ALGORITHMS.md §2.1).

A layer's weight gradient is handled as a matrix G (d_out × d_in'), the bias folded in as the
last column. Factors A (d_in' × d_in'), S (d_out × d_out) are EMAs of aᵀa/n and sᵀs/n; the
damping is split by π and the damped factors are inverted by Newton–Schulz (or Cholesky);
the preconditioned gradient is U = S_λ⁻¹ G A_λ⁻¹.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from grng_core.context import select
from grng_core.linalg import spd_inverse
from grng_core.tree import index_of

PI_MIN, PI_MAX = 1e-4, 1e4


class Layer(NamedTuple):
    """A registered layer resolved to leaf positions and its matrix sizes."""

    weight: int
    bias: int | None
    transposed: bool
    d_out: int
    d_in: int  # without the bias column

    @property
    def d_in_ext(self) -> int:
        return self.d_in + (self.bias is not None)


def resolve(specs, container, leaves) -> list[Layer]:
    """Layers from LayerSpecs: leaf positions and (d_out, d_in); checks the shapes."""
    layers, used = [], set()
    for spec in specs:
        w = index_of(container, spec.weight)
        b = None if spec.bias is None else index_of(container, spec.bias)
        shape = tuple(leaves[w].shape)
        if len(shape) < 2:
            raise ValueError(f"layer weight {spec.weight!r} has shape {shape}: needs >= 2 axes")
        if spec.transposed:
            d_out, d_in = shape[-1], math.prod(shape[:-1])
        else:
            d_out, d_in = shape[0], math.prod(shape[1:])
        if b is not None and tuple(leaves[b].shape) != (d_out,):
            raise ValueError(
                f"layer bias {spec.bias!r} has shape {tuple(leaves[b].shape)}, expected ({d_out},)"
            )
        for i in (w, b):
            if i is not None and i in used:
                raise ValueError(f"leaf {container.keys[i]!r} is registered in two layers")
            used.add(i)
        layers.append(Layer(w, b, bool(spec.transposed), d_out, d_in))
    return layers


def covered(layers) -> set[int]:
    """Leaf positions inside registered layers (the rest use the diagonal)."""
    return {i for L in layers for i in (L.weight, L.bias) if i is not None}


def layer_id(L: Layer) -> str:
    """The state key of a layer; it encodes the layout, so the state alone describes it."""
    return f"{L.weight}/{'-' if L.bias is None else L.bias}/{'T' if L.transposed else 'N'}"


def from_state(kstate: dict, leaves) -> list[tuple[str, Layer]]:
    """(key, Layer) pairs rebuilt from the state's keys and the params' shapes."""
    out = []
    for key in sorted(kstate, key=lambda k: int(k.split("/")[0])):
        w, b, tr = key.split("/")
        w = int(w)
        shape = tuple(leaves[w].shape)
        transposed = tr == "T"
        d_out, d_in = (shape[-1], math.prod(shape[:-1])) if transposed else (
            shape[0], math.prod(shape[1:]))
        out.append((key, Layer(w, None if b == "-" else int(b), transposed, d_out, d_in)))
    return out


def init(layers, xp, sdtype, device) -> dict:
    """Per layer: zero factors and identity inverses (replaced at the first refresh)."""
    return {
        layer_id(L): {
            "A": xp.zeros((L.d_in_ext, L.d_in_ext), dtype=sdtype, device=device),
            "S": xp.zeros((L.d_out, L.d_out), dtype=sdtype, device=device),
            "A_inv": xp.eye(L.d_in_ext, dtype=sdtype, device=device),
            "S_inv": xp.eye(L.d_out, dtype=sdtype, device=device),
        }
        for L in layers
    }


def match_stats(layers, stats_layers, container) -> dict:
    """{layer key: LayerStats}: every registered layer must have statistics of its width."""
    if not layers:
        return {}
    if stats_layers is None:
        raise ValueError("structure 'kfac' needs stats.layers (K-FAC layer statistics) on "
                         "curvature steps")
    by_weight = {}
    for s in stats_layers:
        by_weight[index_of(container, s.weight)] = s
    out = {}
    for key, L in layers:
        s = by_weight.get(L.weight)
        if s is None:
            raise ValueError(f"stats.layers has no statistics for the layer of weight "
                             f"{container.keys[L.weight]!r} registered at init")
        if s.inputs.shape[-1] != L.d_in or s.output_grads.shape[-1] != L.d_out:
            raise ValueError(
                f"layer {s.weight!r}: inputs (n, {s.inputs.shape[-1]}) and output_grads "
                f"(n, {s.output_grads.shape[-1]}) do not match the weight's (d_in={L.d_in}, "
                f"d_out={L.d_out})"
            )
        out[key] = s
    if len(by_weight) != len(layers):
        extra = set(by_weight) - {L.weight for _, L in layers}
        raise ValueError(f"stats.layers has layers not registered at init (weights "
                         f"{[container.keys[i] for i in extra]})")
    return out


def rows(L: Layer, ls, ctx):
    """(a', s) in the state dtype: inputs with the ones column when the layer has a bias."""
    xp = ctx.xp
    a = xp.astype(xp.reshape(ls.inputs, (-1, L.d_in)), ctx.sdtype, copy=False)
    s = xp.astype(xp.reshape(ls.output_grads, (-1, L.d_out)), ctx.sdtype, copy=False)
    if L.bias is not None:
        a = xp.concat([a, xp.ones((a.shape[0], 1), dtype=ctx.sdtype, device=ctx.device)], axis=1)
    return a, s


def batch_factors(L: Layer, ls, ctx):
    """Â = aᵀa/n, Ŝ = sᵀs/n for one batch, averaged over replicas (§2.1)."""
    a, s = rows(L, ls, ctx)
    xp = ctx.xp
    A_hat = ctx.mean(xp.matrix_transpose(a) @ a / a.shape[0])
    S_hat = ctx.mean(xp.matrix_transpose(s) @ s / s.shape[0])
    return A_hat, S_hat


def ema(old, new, beta, ctx):
    """βold + (1−β)new; the first update takes `new` (§2.1)."""
    return ctx.xp.where(ctx.first, new, beta * old + (1.0 - beta) * new)


def update_factors(kstate, layers, stats, beta, ctx) -> dict:
    """EMA of every layer's factors with this batch (selected on curvature steps)."""
    new = {}
    for key, L in layers:
        A_hat, S_hat = batch_factors(L, stats[key], ctx)
        old = kstate[key]
        A = ema(old["A"], A_hat, beta, ctx)
        S = ema(old["S"], S_hat, beta, ctx)
        new[key] = {**old, "A": select(ctx.curvature, A, old["A"], ctx.xp),
                    "S": select(ctx.curvature, S, old["S"], ctx.xp)}
    return new


def pi_split(trace_a, d_a, trace_s, d_s, xp):
    """π = √((tr A / d_A) / (tr S / d_S)), clamped to [1e-4, 1e4] (§2.1)."""
    num = trace_a / d_a
    den = trace_s / d_s
    ratio = num / xp.where(den > 0, den, xp.ones_like(den))
    ratio = xp.where(den > 0, ratio, xp.full_like(ratio, PI_MAX**2))
    return xp.clip(xp.sqrt(ratio), PI_MIN, PI_MAX)


def trace(M, xp):
    if hasattr(xp, "linalg") and hasattr(xp.linalg, "trace"):
        return xp.linalg.trace(M)
    return xp.sum(M * xp.eye(M.shape[0], dtype=M.dtype, device=_dev(M)))


def _dev(x):
    import array_api_compat

    return array_api_compat.device(x)


def damped(A, S, damping, xp):
    """(A + π√λ I, S + (√λ/π) I) — the π-corrected damping split (§2.1)."""
    pi = pi_split(trace(A, xp), A.shape[0], trace(S, xp), S.shape[0], xp)
    root = xp.sqrt(xp.asarray(damping, dtype=A.dtype, device=_dev(A)))
    eye_a = xp.eye(A.shape[0], dtype=A.dtype, device=_dev(A))
    eye_s = xp.eye(S.shape[0], dtype=S.dtype, device=_dev(S))
    return A + (pi * root) * eye_a, S + (root / pi) * eye_s


def refresh_inverses(kstate, layers, damping, ctx, keys) -> dict:
    """Newton–Schulz (or Cholesky) inverses of the damped factors, warm started."""
    xp = ctx.xp
    kw = dict(method=ctx.method, tol=ctx.tol, max_iter=ctx.max_iter)
    new = {}
    for key, L in layers:
        old = kstate[key]
        A_l, S_l = damped(old["A"], old["S"], damping, xp)
        name = f"layer {keys[L.weight]!r}"
        A_inv = spd_inverse(A_l, xp, warm=old["A_inv"], name=f"A of {name}", **kw)
        S_inv = spd_inverse(S_l, xp, warm=old["S_inv"], name=f"S of {name}", **kw)
        new[key] = {**old, "A_inv": select(ctx.inverse, A_inv, old["A_inv"], xp),
                    "S_inv": select(ctx.inverse, S_inv, old["S_inv"], xp)}
    return new


def grad_matrix(L: Layer, leaves, xp):
    """The layer's gradient as G (d_out × d_in'), bias as the last column."""
    W = leaves[L.weight]
    G = xp.reshape(W, (L.d_in, L.d_out)) if L.transposed else xp.reshape(W, (L.d_out, L.d_in))
    if L.transposed:
        G = xp.matrix_transpose(G)
    if L.bias is not None:
        G = xp.concat([G, xp.reshape(leaves[L.bias], (L.d_out, 1))], axis=1)
    return G


def split_matrix(L: Layer, U, shapes, xp) -> dict:
    """Leaves {position: array} from the matrix U (inverse of grad_matrix)."""
    W = U[:, : L.d_in]
    if L.transposed:
        W = xp.matrix_transpose(W)
    out = {L.weight: xp.reshape(W, shapes[L.weight])}
    if L.bias is not None:
        out[L.bias] = xp.reshape(U[:, L.d_in], shapes[L.bias])
    return out


def precondition(kstate, layers, leaves, xp) -> dict:
    """U = S_λ⁻¹ G A_λ⁻¹ for every layer: {position: preconditioned leaf}."""
    shapes = [tuple(x.shape) for x in leaves]
    out = {}
    for key, L in layers:
        U = kstate[key]["S_inv"] @ grad_matrix(L, leaves, xp) @ kstate[key]["A_inv"]
        out.update(split_matrix(L, U, shapes, xp))
    return out
