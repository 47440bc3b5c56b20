"""K-FAC: Kronecker factors of dense and convolution layers (ALGORITHMS.md §2.1).

A layer's weight gradient is handled as a matrix G (d_out × d_in'), the bias folded in as the
last column. Factors A (d_in' × d_in'), S (d_out × d_out) are EMAs of aᵀa/n and sᵀs/n; the
damping is split by π and the damped factors are inverted by Newton–Schulz (or Cholesky);
the preconditioned gradient is U = S_λ⁻¹ G A_λ⁻¹.
"""

from __future__ import annotations

import math

from grng_core import fused
from grng_core.concrete import branch, branchable, is_traced, on_host
from grng_core.context import select
from grng_core.linalg import diagonal_inverse, spd_inverse
from grng_core.state import KfacLayer, LayerLayout
from grng_core.structures import blocks, factored
from grng_core.structures.blocks import Blocks, Product
from grng_core.structures.rows import LayerRows, rows, warn_unstated_batch
from grng_core.tree import device as _dev
from grng_core.tree import index_of
from grng_core.types import InputGram

PI_MIN, PI_MAX = 1e-4, 1e4


def resolve(specs, container, leaves) -> list[LayerLayout]:
    """Layouts from LayerSpecs: leaf positions and (d_out, d_in); checks the shapes."""
    layouts, used = [], set()
    for spec in specs:
        w = index_of(container, spec.weight)
        b = None if spec.bias is None else index_of(container, spec.bias)
        shape = tuple(leaves[w].shape)
        if len(shape) < 2:
            raise ValueError(f"layer weight {spec.weight!r} has shape {shape}: needs >= 2 axes")
        k = getattr(spec, "in_axes", None)
        k = len(shape) - 1 if k is None else int(k)
        if not 1 <= k < len(shape):
            raise ValueError(f"layer weight {spec.weight!r} of shape {shape}: in_axes={k} must "
                             f"leave at least one input and one output axis")
        if spec.transposed:  # (in..., out...)
            d_in, d_out = math.prod(shape[:k]), math.prod(shape[k:])
        else:  # (out..., in...)
            d_out, d_in = math.prod(shape[:len(shape) - k]), math.prod(shape[len(shape) - k:])
        if spec.a_diagonal and (b is not None or len(shape) != 2):
            raise ValueError(f"embedding layer {spec.weight!r}: a_diagonal layers have a 2-d "
                             f"weight and no bias (got shape {shape}, bias {spec.bias!r})")
        if b is not None and math.prod(leaves[b].shape) != d_out:
            raise ValueError(
                f"layer bias {spec.bias!r} has shape {tuple(leaves[b].shape)}, expected "
                f"{d_out} elements (the weight's output axes)")
        for i in (w, b):
            if i is not None and i in used:
                raise ValueError(f"leaf {container.keys[i]!r} is registered in two layers")
            used.add(i)
        layouts.append(LayerLayout(w, b, bool(spec.transposed), d_out, d_in,
                                   bool(getattr(spec, "a_diagonal", False))))
    return layouts


def oversized(layout: LayerLayout, limit: int | None) -> str | None:
    """Why `max_factor_dim` = limit leaves this layer to the diagonal (§2.1), or None: a
    factor A (d_in + bias; not an embedding's diagonal A) or S (d_out) larger than limit."""
    if limit is None:
        return None
    big = [f"{name} {d}x{d}" for name, d in (("A", 0 if layout.a_diagonal else layout.d_in_ext),
                                              ("S", layout.d_out)) if d > limit]
    if not big:
        return None
    return (f"its K-FAC factor {' and '.join(big)} exceeds max_factor_dim={limit} (d² memory, "
            "d³ inverses); raise max_factor_dim to keep it on K-FAC")


def covered(layouts) -> set[int]:
    """Leaf positions inside registered layers (the rest use the diagonal)."""
    return {i for L in layouts for i in L.positions}


def init(layouts, xp, sdtype, device, traces: bool = False,
         eigen: bool = False) -> tuple[KfacLayer, ...]:
    """Per layer: zero factors and identity inverses (replaced at the first refresh); with
    `traces`, the undamped trace EMAs R-Kalman's belief keeps (§3.3); with `eigen`, identity
    eigenbases and zero eigenvalues in place of the inverses (a per-step damping, §3.2)."""

    def zero():
        return xp.zeros((), dtype=sdtype, device=device) if traces else None

    def eye(d):
        return xp.eye(d, dtype=sdtype, device=device)

    def vals(d):
        return xp.zeros((d,), dtype=sdtype, device=device) if eigen else None

    out = []
    for L in layouts:
        a, s = L.d_in_ext, L.d_out
        if L.a_diagonal:  # an embedding: A and its inverse as vectors, no eigenbasis
            A = xp.zeros((a,), dtype=sdtype, device=device)
            A_inv = None if eigen else xp.ones((a,), dtype=sdtype, device=device)
            A_vecs = None
        else:
            A = xp.zeros((a, a), dtype=sdtype, device=device)
            A_inv = None if eigen else eye(a)
            A_vecs = eye(a) if eigen else None
        out.append(KfacLayer(
            layout=L, A=A, S=xp.zeros((s, s), dtype=sdtype, device=device),
            A_inv=A_inv, S_inv=None if eigen else eye(s), trace_A=zero(), trace_S=zero(),
            A_vecs=A_vecs, A_vals=vals(a), S_vecs=eye(s) if eigen else None, S_vals=vals(s)))
    return tuple(out)


def match_stats(layers, stats_layers, container, partial: bool = False,
                absent=()) -> list:
    """The LayerStats of every registered layer, in the layers' order (checked widths);
    None for a layer without statistics where `partial` (steps that only precondition) or
    where the adapter names its weight `absent` (`Stats.absent`: it took no part)."""
    if not layers:
        return []
    gone = {index_of(container, k) for k in absent}
    if stats_layers is None and (partial or len(gone) == len(layers)):
        return [None] * len(layers)
    if stats_layers is None:
        raise ValueError("structure 'kfac' needs stats.layers (K-FAC layer statistics) on "
                         "curvature steps")
    by_weight = {index_of(container, s.weight): s for s in stats_layers}
    out: list = []
    for layer in layers:
        L = layer.layout
        s = by_weight.get(L.weight)
        if s is None and (partial or L.weight in gone):
            out.append(None)
            continue
        if s is None:
            raise ValueError(f"stats.layers has no statistics for the layer of weight "
                             f"{container.keys[L.weight]!r} registered at init")
        width = (s.inputs.gram if isinstance(s.inputs, InputGram) else s.inputs).shape[-1]
        if (not L.a_diagonal and width != L.d_in) or s.output_grads.shape[-1] != L.d_out:
            raise ValueError(
                f"layer {s.weight!r}: inputs (n, {width}) and output_grads "
                f"(n, {s.output_grads.shape[-1]}) do not match the weight's (d_in={L.d_in}, "
                f"d_out={L.d_out})"
            )
        out.append(s)
    extra = set(by_weight) - {layer.layout.weight for layer in layers}
    if extra:
        raise ValueError(f"stats.layers has layers not registered at init (weights "
                         f"{[container.keys[i] for i in extra]})")
    return out


def batch_factors(r: LayerRows, ctx):
    """Â = aᵀa/n, Ŝ = sᵀs/B for one batch (B = n for a dense layer; shared weights keep the
    per-example scale, K-FAC "expand"), averaged over replicas (§2.1)."""
    xp = ctx.xp
    if r.gram is not None:  # rows reduced as they arrived: a'ᵀa' itself (`input_gram`)
        A_hat = ctx.mean(r.gram / r.s.shape[0])
    elif r.a.ndim == 1:  # an embedding: the rows give the token frequencies directly
        A_hat = ctx.mean(r.a)
    else:
        A_hat = ctx.mean(xp.matrix_transpose(r.a) @ r.a / r.a.shape[0])
    S_hat = ctx.mean(xp.matrix_transpose(r.s) @ r.s / r.batch)
    return A_hat, S_hat


def ema(old, new, beta, ctx):
    """βold + (1−β)new; the first update takes `new` (§2.1). On host arrays that choice is a
    Python branch (no d × d select); elsewhere a `where` (fused by XLA under jit)."""
    if not is_traced(ctx.first) and on_host(ctx.first):
        return new if bool(ctx.first) else fused.ema(old, new, beta, ctx.xp)
    return ctx.xp.where(ctx.first, new, fused.ema(old, new, beta, ctx.xp))


def all_rows(layers, stats, ctx) -> list:
    """The rows of every layer (stats from `match_stats`; None stays None), cast once."""
    out = [None if ls is None else rows(layer.layout, ls, ctx)
           for layer, ls in zip(layers, stats)]
    warn_unstated_batch(stats, out)
    return out


def update_factors(layers, batch_rows, beta, ctx, flags) -> tuple[KfacLayer, ...]:
    """EMA of every layer's factors with this batch's rows, selected on the layer's curvature
    flag (`flags`: (curvature, inverse) per layer, `grng_core.schedule.layer_flags`)."""
    new = []
    for layer, r, (curvature, _) in zip(layers, batch_rows, flags):
        if curvature is False:
            new.append(layer)
            continue
        A_hat, S_hat = batch_factors(r, ctx)
        A = ema(layer.A, A_hat, beta, ctx)
        S = ema(layer.S, S_hat, beta, ctx)
        new.append(layer._replace(A=select(curvature, A, layer.A, ctx.xp),
                                  S=select(curvature, S, layer.S, ctx.xp)))
    return tuple(new)


def pi_split(trace_a, d_a, trace_s, d_s, xp):
    """π = √((tr A / d_A) / (tr S / d_S)), clamped to [1e-4, 1e4] (§2.1). The denominator is
    floored where the clamp would act anyway (so no division overflows or divides by zero): tr S
    = 0 gives the upper clamp (tr A not vanishing); with tr A = 0 too, π is moot (A_λ ⊗ S_λ =
    λI for any π)."""
    num = trace_a / d_a
    den = xp.maximum(trace_s / d_s, num / PI_MAX**2)
    den = xp.clip(den, min=float(xp.finfo(den.dtype).smallest_normal))
    return xp.clip(xp.sqrt(num / den), PI_MIN, PI_MAX)


def trace(M, xp):
    if M.ndim == 1:  # a diagonal kept as a vector
        return xp.sum(M)
    if hasattr(xp, "linalg") and hasattr(xp.linalg, "trace"):
        return xp.linalg.trace(M)
    return xp.sum(M * xp.eye(M.shape[0], dtype=M.dtype, device=_dev(M)))


def damped(A, S, root, xp):
    """(A + π√λ I, S + (√λ/π) I) — the π-corrected damping split (§2.1); root = √λ."""
    pi = pi_split(trace(A, xp), A.shape[0], trace(S, xp), S.shape[0], xp)
    return shifted(A, pi * root, xp), shifted(S, root / pi, xp)


def shifted(M, shift, xp):
    """M + shift·I (a diagonal kept as a vector: M + shift)."""
    if M.ndim == 1:
        return M + shift
    return fused.add_to_diagonal(M, shift, xp)


def refresh(layers, matrices, ctx, keys, which) -> tuple[KfacLayer, ...]:
    """A_inv, S_inv of every layer: the inverses of `matrices(layer) -> (A', S')` by the
    configured method, warm started from the current ones, selected on the layer's inverse
    flag (`which`, one per layer). K-FAC inverts its damped factors (§2.1); R-Kalman's direct
    refresh its carried ones."""
    xp = ctx.xp
    kw = dict(method=ctx.method, tol=ctx.tol, max_iter=ctx.max_iter)
    new = []
    log = ctx.incidents
    for layer, inverse in zip(layers, which):
        if inverse is False:
            new.append(layer)
            continue
        A_m, S_m = matrices(layer)
        w = layer.layout.weight
        name = f"layer {keys[w]!r}"
        rescue_A = None if log is None else log.rescue(w, "A", keys[w])
        if A_m.ndim == 1:  # an embedding's diagonal A
            A_inv = diagonal_inverse(A_m, xp, f"A of {name}", rescue_A)
        else:
            A_inv = spd_inverse(A_m, xp, warm=layer.A_inv, name=f"A of {name}",
                                rescue=rescue_A, **kw)
        S_inv = spd_inverse(S_m, xp, warm=layer.S_inv, name=f"S of {name}",
                            rescue=None if log is None else log.rescue(w, "S", keys[w]), **kw)
        new.append(layer._replace(A_inv=select(inverse, A_inv, layer.A_inv, xp),
                                  S_inv=select(inverse, S_inv, layer.S_inv, xp)))
    return tuple(new)


def refresh_inverses(layers, damping, ctx, keys, which) -> tuple[KfacLayer, ...]:
    """Inverses of the damped factors (A + π√λ I, S + (√λ/π) I), §2.1, where `which`."""
    xp = ctx.xp
    root = xp.sqrt(xp.asarray(damping, dtype=ctx.sdtype, device=ctx.device))
    return refresh(layers, lambda layer: damped(layer.A, layer.S, root, xp), ctx, keys, which)


def right_multiply(M, A_inv, xp):
    """M A⁻¹ (a diagonal A⁻¹ kept as a vector: columns scaled)."""
    if A_inv.ndim == 1:
        return M * A_inv[None, :]
    return M @ A_inv


def factored_rows(layers, batch_rows, ctx) -> list[LayerRows | None]:
    """Per layer, its rows where the factored form is cheaper for their shapes (§2.1), else
    None; all None without rows or across replicas (the replica-averaged gradient is not one
    replica's product)."""
    if batch_rows is None or ctx.replicated:
        return [None] * len(layers)
    return [r if r is not None and r.a is not None and not layer.layout.a_diagonal
            and factored.cheaper(layer.layout.d_out, layer.layout.d_in_ext, r.a.shape[0])
            else None for layer, r in zip(layers, batch_rows)]


def stacked_rows(layers, own, matched, coefs, ctx) -> list[LayerRows | None]:
    """Per layer, the rows of Σᵢ cᵢ·sᵢᵀaᵢ/B stacked (`factored.stack`): pass i's rows are the
    step's own (`own`, LayerRows per layer) where `matched[i]` is None, else its LayerStats
    per layer (`match_stats`). None (dense, as `factored_rows`) where a pass lacks the layer,
    the passes' B differ, or the factored form is not cheaper for the stacked count (§2.1);
    rows are cast only for the layers that take it."""
    out: list[LayerRows | None] = []
    for j, layer in enumerate(layers):
        L, mine = layer.layout, own[j]
        if (ctx.replicated or L.a_diagonal or mine is None or mine.a is None
                or not factored.cheaper(L.d_out, L.d_in_ext, len(coefs) * mine.a.shape[0])):
            out.append(None)
            continue
        if any(m is not None and m[j] is None for m in matched):
            out.append(None)  # a pass without this layer's rows
            continue
        parts = [mine if m is None else rows(L, m[j], ctx) for m in matched]
        usable = (len({r.batch for r in parts}) == 1 and all(r.a is not None for r in parts)
                  and factored.cheaper(L.d_out, L.d_in_ext, sum(r.a.shape[0] for r in parts)))
        out.append(factored.stack(parts, coefs, ctx.xp) if usable else None)
    return out


def _dense(layer, leaves, xp) -> Product:
    """S⁻¹ G A⁻¹ by blocks (`blocks.left_multiply`, `blocks.product`)."""
    L = layer.layout
    M = blocks.left_multiply(layer.S_inv, L, leaves, xp)
    if layer.A_inv.ndim == 1:  # an embedding's diagonal A⁻¹ (no bias): columns scaled
        return Blocks(right_multiply(M, layer.A_inv, xp))
    return blocks.product(M, layer.A_inv, L)


def precondition(layers, leaves, xp, rows_of=None, dense=None, factored_form=None) -> dict:
    """U = S_λ⁻¹ G A_λ⁻¹ for every layer: {position: preconditioned leaf}. `rows_of`: per
    layer LayerRows or None (`factored_rows`): the factored form where G is c times their
    product, checked on probes (§2.1), and a branch costs no device sync; else dense.
    dense(layer, leaves) / factored_form(layer, rows, c): U as a `blocks.Product` (`Blocks`
    on eager arrays, `Joined` under tracing; default: with the explicit inverses;
    `kfac_eigen` passes its eigenbasis ones)."""
    dense = dense or (lambda layer, lv: _dense(layer, lv, xp))
    factored_form = factored_form or (
        lambda layer, r, c: factored.apply(r, layer.S_inv, layer.A_inv, c, layer.layout, xp))
    shapes = [tuple(x.shape) for x in leaves]
    rows_of = rows_of or [None] * len(layers)
    out = {}
    for layer, r in zip(layers, rows_of):
        L = layer.layout
        weight = leaves[L.weight]
        if r is None or not branchable(weight):
            U = dense(layer, leaves)
        else:
            P = factored.probes(L.d_in_ext, xp, weight.dtype, _dev(weight))
            c, ok = factored.product_scale(blocks.grad_probes(L, leaves, P, xp), P, r, xp)
            U = branch(ok, lambda layer=layer, r=r, c=c: factored_form(layer, r, c),
                       lambda layer=layer: dense(layer, leaves))
        out.update(blocks.to_leaves(L, U, shapes, xp))
    return out
