"""The data the core exchanges with adapters: batch statistics, oracles, collectives.

These are plain named tuples: they hold arrays (or callables) and carry no math.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple


class LayerSpec(NamedTuple):
    """Which leaves form one K-FAC layer (given to `init(params, layers=...)`).

    weight / bias: keys of the leaves (list index or dict key); bias None when absent.
    transposed: see LayerStats.
    a_diagonal: an embedding (weight (vocab, d) transposed, or (d, vocab)): A is the diagonal
        of token frequencies (§2.1 "Embeddings"); its LayerStats.inputs are token ids.
    in_axes: how many of the weight's axes index its input: the leading ones when transposed
        (a Flax DenseGeneral kernel (in..., out...)), the trailing ones otherwise; None: all
        but the output axis (d_out is the last axis transposed, the first otherwise).
    """

    weight: Hashable
    bias: Hashable | None = None
    transposed: bool = False
    a_diagonal: bool = False
    in_axes: int | None = None


class LayerStats(NamedTuple):
    """K-FAC statistics of one dense (or unfolded convolution) layer, ALGORITHMS.md §2.1.

    weight: key of the weight leaf in the params container (list index or dict key).
    bias: key of the bias leaf, or None when the layer has none.
    inputs: a, shape (n, d_in): the layer's inputs (rows: examples, or positions/patches).
        Do not append the column of ones for the bias: the core does it. Or the rows reduced
        as they arrived (`InputGram`, n ≥ d_in + 1, where `Requirements.input_gram`). For an
        embedding (LayerSpec.a_diagonal) the token ids, shape (n,) integers (the one-hot
        rows' indices).
    output_grads: s, shape (n, d_out): rows = B * dL/dz_i (per-example gradients of l_i with
        respect to the layer output, B the batch size).
    transposed: False when the weight is stored (d_out, d_in) as in torch, True when it is
        stored (d_in, d_out) as in JAX/Flax. A convolution weight of shape
        (d_out, c, kh, kw) is treated as (d_out, c*kh*kw).
    batch_size: B, the number of examples the rows come from; None means B = n (a dense
        layer, one row per example). For shared weights (a convolution's positions, a
        sequence's tokens: n = B·T rows) pass B: the layer gradient is G = sᵀa/B and
        Ŝ = sᵀs/B (§2.1, K-FAC "expand").
    """

    weight: Hashable
    bias: Hashable | None
    inputs: Any
    output_grads: Any
    transposed: bool = False
    batch_size: int | None = None


class InputGram(NamedTuple):
    """A layer's input rows a (n × d_in) reduced as they arrived, in place of the rows as
    `LayerStats.inputs` (ALGORITHMS.md §2.1, "Input rows reduced early";
    `grng_core.structures.input_gram.reduce_rows` makes one): gram = aᵀa (d_in × d_in), total =
    Σ a over the rows (d_in,), n the row count, probed = P·a'ᵀ (2 × n): the first-step check's
    fixed probes P (2 × d_in', the bias column included) applied to the rows. Only where the rows
    are at least d_in' (`input_gram.reducible`), and not for R-Kalman (its belief observes the
    rows themselves)."""

    gram: Any
    total: Any
    n: int
    probed: Any


class Stats(NamedTuple):
    """What one batch gives the curvature structure.

    per_example_grads: same container as params, each leaf with a leading batch axis B holding
        grad l_i (the per-example loss gradients, whose mean is the batch gradient g).
        Needed by `woodbury`; used by `diagonal` when present.
    layers: sequence of LayerStats, needed by `kfac`.
    absent: weight keys of registered K-FAC layers that took no part in this batch (a branch
        the model did not run, a multi-task head without a loss term): on a curvature step
        their factors are kept as they are, instead of the error a layer missing from
        `layers` otherwise raises.
    """

    per_example_grads: Any = None
    layers: Sequence[LayerStats] | None = None
    absent: tuple = ()

    def rows_present(self) -> Stats:
        """These statistics with a layer of no rows (a mixture of experts' expert no token
        was routed to) named `absent` instead: its factors are kept, not 0/0. A static
        choice (array shapes)."""
        layers = self.layers or ()
        empty = [s.weight for s in layers if s.output_grads.shape[0] == 0]
        if not empty:
            return self
        kept = [s for s in layers if s.output_grads.shape[0] != 0]
        return self._replace(layers=kept or None, absent=(*self.absent, *empty))


class Oracle(NamedTuple):
    """What the framework can compute on the same batch (ALGORITHMS.md §1).

    grad_fn(params) -> grads: the batch gradient at other parameters (finite-difference GR).
    hvp_fn(params, vector) -> H @ vector, the Hessian-vector product of the batch loss
        (double backprop). Both take and return the same container as params.
    grad_rows_fn(params) -> (grads, Stats): grad_fn that also gives the K-FAC rows of its
        pass (`Stats.layers`, empirical: the closure's own labels), so that a
        finite-difference ĝ, a combination of the passes' gradients, is preconditioned in
        factored form (§2.1). Used instead of grad_fn where given (`Requirements.fd_rows`).
    own_base: True when the gradient passed to `update` need not be grad_fn's at the
        params (optax transformations chained before the optimizer: clipping, scaling; a
        model whose grad_fn draws other dropout masks than the caller's gradient): the
        forward and backward differences are then taken against grad_fn(params), one more
        pass, so that they differentiate one function (§1). False (torch's closure, which
        reproduces the first pass, RNG included): against the passed gradient.
    along_fn(c, key) -> the batch gradient at θ + c·g (c a 0-d array, θ and g the whole
        model's: every part moved, `Whole`), or with grad_rows_fn given (grads, Stats) as that
        returns; used instead of grad_fn(θ + c·g) for the shifted passes where given. key: a
        hashable that is equal for two calls of one step only where their c are equal
        (`estimators.shift_key`), or None: parts of a model may then share one pass. An
        along_fn(c) without the keyword is called without it.
    """

    grad_fn: Callable[[Any], Any] | None = None
    hvp_fn: Callable[[Any, Any], Any] | None = None
    grad_rows_fn: Callable[[Any], Any] | None = None
    own_base: bool = False
    along_fn: Callable[[Any], Any] | None = None


class Whole(NamedTuple):
    """What an update of one part of a model (a torch parameter group beside others) reads
    of the whole model, so that splitting the parameters into parts changes nothing:

    grad_sq_norm: ‖g‖² over every leaf of the model's gradient (0-d array): RING's
        c_t = λ + ρ‖g‖² (§3.2) and the finite-difference radius ε = r/‖g‖ (§1); None: the
        part's own.
    kl: the trust region's ⟨d, ĝ⟩ is summed over the parts (§3 tail): `Optimizer.prepare`
        then returns this part's η²⟨d, ĝ⟩ (also where the part's own kl_clip is off) and
        `Optimizer.finish` takes the sum.
    The gradient-regularisation oracle of a part differentiates the whole model too: its
    hvp_fn returns the part's rows of H·g with g the whole gradient, and its `along_fn(c,
    key)` the part's gradient at θ + c·g with every part moved (`Oracle.along_fn`).
    """

    grad_sq_norm: Any = None
    kl: bool = False


class Collective(NamedTuple):
    """Cross-replica reductions for data-parallel training (the adapters supply them).

    mean(x) -> x averaged over replicas (same shape): used on batch curvature statistics
        (K-FAC's a^T a / n and s^T s / n, the diagonal's q).
    gather(x) -> x concatenated over replicas along axis 0: used on per-example rows
        (woodbury's J, the Kalman K-FAC correction's a and s rows).
    replicas: their number (a Python int): a layer's rows per step for the per-layer warm-up
        (§2.1) are its rows on one replica times this (equal batches per replica assumed).
    Gradients are expected already averaged (DDP and pmean do that).
    """

    mean: Callable[[Any], Any] | None = None
    gather: Callable[[Any], Any] | None = None
    replicas: int = 1


class Requirements(NamedTuple):
    """What an optimizer needs the adapter to collect (static, known when it is built).

    layer_stats: K-FAC layer statistics (`Stats.layers`) on curvature steps.
    per_example_grads: per-example gradients (`Stats.per_example_grads`) on curvature steps.
    grad_fn / hvp_fn: which oracle the GR estimator calls every step.
    fisher: "empirical" or "mc": which labels the adapter uses for the statistics.
    layer_rows: the K-FAC rows are worth handing over on every step, not only on curvature
        steps: the direction preconditions the batch gradient itself, so the core can use the
        factored form (§2.1) where the rows are the empirical Fisher's (free from the
        gradient's own backward pass).
    fd_rows: the finite-difference ĝ can be preconditioned in factored form when the oracle
        gives its passes' rows (`Oracle.grad_rows_fn`); the batch's own rows are then worth
        handing over on every step too.
    input_gram: a layer's input rows may arrive reduced (`InputGram`, §2.1 "Input rows
        reduced early") where `grng_core.structures.input_gram.reducible` says so: K-FAC
        factors of RENG, RING and NGD; not R-Kalman's belief, which observes the rows.
    """

    layer_stats: bool
    per_example_grads: bool
    grad_fn: bool
    hvp_fn: bool
    fisher: str
    layer_rows: bool = False
    fd_rows: bool = False
    input_gram: bool = False
