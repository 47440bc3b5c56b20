"""A K-FAC layer's input rows reduced as they arrive (ALGORITHMS.md §2.1, "Input rows reduced
early"): what a refresh and the first step's check read of the rows a, without the rows.

A convolution's rows are its unfolded patches, n = B·H·W rows of C·kh·kw values: k² times its
input, which an adapter that keeps them holds from the forward pass to the step (a 64-channel
3x3 convolution on 32x32 images at batch 64: 151 MB of rows for a 16 MB input). An adapter may
instead reduce each call's rows in its forward hook (`reduce_rows`; a stride-1 convolution's
without patches, `conv_gram`) and drop them; the core then reads
- Â = a'ᵀa'/n from `InputGram.gram` (a' = [a | 1] where the layer has a bias: `rows.augmented`),
- the first-step check's P·a'ᵀ (`grng_core.structures.explained`) from `InputGram.probed`, the
  check's two fixed probes (`factored.probes`) applied to the rows as they arrived.
Only where the factored form could not serve (`reducible`: it is cheaper only for
n < d_in' rows, and an InputGram has none to stack), and never for R-Kalman, whose belief
observes the rows themselves (§3.3).
"""

from __future__ import annotations

from grng_core.structures import factored
from grng_core.tree import device
from grng_core.types import InputGram


def reducible(d_out: int, d_in_ext: int, n: int) -> bool:
    """Whether `n` rows of a layer (d_in' = d_in + 1 with a bias) may arrive reduced: the
    factored form (§2.1) would not read them (it pays only for fewer rows than d_in', so no
    count of calls or passes that adds rows makes it pay) and the Gram matrix is no larger
    than the rows."""
    return n >= d_in_ext and not factored.cheaper(d_out, d_in_ext, n)


def reduce_rows(a, has_bias: bool, xp, dtype) -> InputGram:
    """One call's rows a (n × d_in) as an `InputGram`, computed in `dtype` (the state dtype,
    as the core would cast the rows): aᵀa, Σ a, n and P·a'ᵀ (2 × n) for the probes P of
    d_in' columns."""
    a = xp.astype(a, dtype, copy=False)
    n, d_in = a.shape
    P = factored.probes(d_in + int(has_bias), xp, dtype, device(a))
    probed = P[:, :d_in] @ xp.matrix_transpose(a)
    if has_bias:
        probed = probed + P[:, d_in:]
    return InputGram(gram=xp.matrix_transpose(a) @ a, total=xp.sum(a, axis=0), n=n,
                     probed=probed)


def combine(parts, xp) -> InputGram:
    """The InputGram of the rows of `parts` (InputGrams of one layer's calls) stacked."""
    if len(parts) == 1:
        return parts[0]
    gram, total = parts[0].gram, parts[0].total
    for p in parts[1:]:
        gram, total = gram + p.gram, total + p.total
    return InputGram(gram=gram, total=total, n=sum(p.n for p in parts),
                     probed=xp.concat([p.probed for p in parts], axis=1))


def input_arrays(inputs) -> tuple:
    """The arrays of a `LayerStats.inputs`: the rows, or an InputGram's three (for the namespace
    and the non-finite check of the statistics, §4)."""
    if isinstance(inputs, InputGram):
        return inputs.gram, inputs.total, inputs.probed
    return (inputs,)
