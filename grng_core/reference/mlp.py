"""A small MLP with hand-written forward, backward and Hessian-vector passes (array API only).

Layer k (0-based, K layers): z_k = a_k W_kᵀ + b_k, W_k of shape (d_out, d_in) (torch layout),
a_0 = x, a_{k+1} = act(z_k); the last z is the output. Mean loss L = (1/B) Σᵢ ℓᵢ with
`softmax_ce`: ℓᵢ = -Σ_c y_ic log softmax(zᵢ)_c, or `mse`: ℓᵢ = ½‖zᵢ - yᵢ‖².

Every method takes `params` as a list of arrays of one library and traces under `jax.jit`
(no host values, no branches on values), except `init` and `sample_targets` (NumPy RNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from grng_core.reference.arrays import from_numpy, to_numpy
from grng_core.types import LayerStats, Oracle, Stats

ACTIVATIONS = ("tanh", "relu")
LOSSES = ("softmax_ce", "mse")
STATS_KINDS = ("layers", "per_example", "both")


class Batch(NamedTuple):
    """Everything one batch gives: the mean loss, its gradient and optional statistics.

    loss: scalar mean loss L.
    grads: list like params, dL/dθ.
    per_example_grads: list, leaf (B, *shape) = dℓᵢ/dθ (mean over axis 0 = grads), or None.
    layers: list of LayerStats (rows of output_grads = B·dL/dzᵢ), or None.
    """

    loss: Any
    grads: list
    per_example_grads: list | None
    layers: list | None


class _Cache(NamedTuple):
    inputs: list  # a_k, the input of layer k
    outputs: list  # z_k
    d1: list  # act'(z_k) for the hidden layers
    d2: list  # act''(z_k) for the hidden layers (None for relu: zero)


class MLP:
    """Dense network `sizes[0] -> ... -> sizes[-1]` with `activation` between the layers.

    params are [W_0, b_0, W_1, b_1, ...] (or [W_0, W_1, ...] with bias=False).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "tanh",
                 loss: str = "softmax_ce", bias: bool = True):
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must hold at least 2 positive widths, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.sizes = sizes
        self.activation = activation
        self.loss_name = loss
        self.bias = bool(bias)
        self.n_layers = len(sizes) - 1

    def __repr__(self) -> str:
        return (f"MLP(sizes={self.sizes}, activation={self.activation!r}, "
                f"loss={self.loss_name!r}, bias={self.bias})")

    # ----------------------------------------------------------------- layout
    def layer_keys(self, k: int) -> tuple[int, int | None]:
        """(weight index, bias index or None) of layer k in the params list."""
        return (2 * k, 2 * k + 1) if self.bias else (k, None)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the params leaves, in order."""
        out: list[tuple[int, ...]] = []
        for d_in, d_out in zip(self.sizes[:-1], self.sizes[1:]):
            out.append((d_out, d_in))
            if self.bias:
                out.append((d_out,))
        return out

    def init(self, seed: int = 0, like: Any = None) -> list:
        """Deterministic params: NumPy float64, or `like`'s library, device and dtype.

        W ~ N(0, gain²/d_in) (gain 1 for tanh, √2 for relu), b ~ N(0, 0.1²).
        """
        rng = np.random.default_rng(seed)
        gain = 1.0 if self.activation == "tanh" else np.sqrt(2.0)
        params = []
        for d_in, d_out in zip(self.sizes[:-1], self.sizes[1:]):
            params.append(rng.standard_normal((d_out, d_in)) * (gain / np.sqrt(d_in)))
            if self.bias:
                params.append(0.1 * rng.standard_normal(d_out))
        if like is not None:
            params = [from_numpy(p, like) for p in params]
        return params

    def _layers(self, params) -> list[tuple[Any, Any]]:
        params = list(params)
        shapes = self.shapes
        if len(params) != len(shapes):
            raise ValueError(f"{self!r} has {len(shapes)} params leaves, got {len(params)}")
        for i, (p, shape) in enumerate(zip(params, shapes)):
            if tuple(p.shape) != shape:
                raise ValueError(f"params[{i}] has shape {tuple(p.shape)}, expected {shape}")
        if self.bias:
            return [(params[2 * k], params[2 * k + 1]) for k in range(self.n_layers)]
        return [(w, None) for w in params]

    def _leaves(self, per_layer: list[tuple[Any, Any]]) -> list:
        out = []
        for gw, gb in per_layer:
            out.append(gw)
            if self.bias:
                out.append(gb)
        return out

    # ---------------------------------------------------------------- forward
    def _forward(self, params, x) -> _Cache:
        xp = array_api_compat.array_namespace(x)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"x must have shape (B, {self.sizes[0]}), got {tuple(x.shape)}")
        layers = self._layers(params)
        a = x
        inputs, outputs, d1, d2 = [], [], [], []
        for k, (w, b) in enumerate(layers):
            z = a @ xp.matrix_transpose(w)
            if b is not None:
                z = z + b
            inputs.append(a)
            outputs.append(z)
            if k < self.n_layers - 1:
                if self.activation == "tanh":
                    a = xp.tanh(z)
                    da = 1.0 - a * a
                    d1.append(da)
                    d2.append(-2.0 * a * da)
                else:
                    da = xp.astype(z > 0.0, z.dtype)
                    a = z * da
                    d1.append(da)
                    d2.append(None)
        return _Cache(inputs, outputs, d1, d2)

    def forward(self, params, x):
        """Network outputs (logits for softmax_ce), shape (B, sizes[-1])."""
        return self._forward(params, x).outputs[-1]

    # ------------------------------------------------------------ output loss
    def _check_targets(self, z, y, what="y"):
        if tuple(y.shape) != tuple(z.shape):
            raise ValueError(f"{what} must have shape {tuple(z.shape)}, got {tuple(y.shape)}")

    @staticmethod
    def _log_softmax(xp, z):
        m = xp.max(z, axis=-1, keepdims=True)
        zc = z - m
        return zc - xp.log(xp.sum(xp.exp(zc), axis=-1, keepdims=True))

    def _example_losses(self, z, y):
        xp = array_api_compat.array_namespace(z, y)
        self._check_targets(z, y)
        if self.loss_name == "softmax_ce":
            return -xp.sum(y * self._log_softmax(xp, z), axis=-1)
        r = z - y
        return 0.5 * xp.sum(r * r, axis=-1)

    def _output_grad(self, z, y, what="y"):
        """dℓᵢ/dzᵢ, rows of shape (B, C) (= B·dL/dzᵢ)."""
        xp = array_api_compat.array_namespace(z, y)
        self._check_targets(z, y, what)
        if self.loss_name == "softmax_ce":
            p = xp.exp(self._log_softmax(xp, z))
            return xp.sum(y, axis=-1, keepdims=True) * p - y
        return z - y

    def _output_hvp(self, z, y, rz):
        """(d²ℓᵢ/dzᵢ²) Rzᵢ row by row."""
        xp = array_api_compat.array_namespace(z, y, rz)
        if self.loss_name == "softmax_ce":
            p = xp.exp(self._log_softmax(xp, z))
            pr = p * rz
            hr = pr - p * xp.sum(pr, axis=-1, keepdims=True)
            return xp.sum(y, axis=-1, keepdims=True) * hr
        return rz

    # --------------------------------------------------------------- backward
    def _backward(self, params, cache: _Cache, s_out) -> list:
        """s_k = dℓᵢ/dz_k for every layer, from the output rows s_out."""
        layers = self._layers(params)
        s = [None] * self.n_layers
        s[-1] = s_out
        for k in range(self.n_layers - 1, 0, -1):
            s[k - 1] = (s[k] @ layers[k][0]) * cache.d1[k - 1]
        return s

    def _grads(self, cache: _Cache, s: list) -> list:
        n = s[-1].shape[0]
        xp = array_api_compat.array_namespace(s[-1])
        per_layer = []
        for a, sk in zip(cache.inputs, s):
            gb = xp.sum(sk, axis=0) / n if self.bias else None
            per_layer.append((xp.matrix_transpose(sk) @ a / n, gb))
        return self._leaves(per_layer)

    def _per_example(self, cache: _Cache, s: list) -> list:
        xp = array_api_compat.array_namespace(s[-1])
        per_layer = []
        for a, sk in zip(cache.inputs, s):
            n, d_out = sk.shape
            gw = xp.reshape(sk, (n, d_out, 1)) * xp.reshape(a, (n, 1, a.shape[1]))
            per_layer.append((gw, sk if self.bias else None))
        return self._leaves(per_layer)

    def _layer_stats(self, cache: _Cache, s: list) -> list:
        return [LayerStats(*self.layer_keys(k), inputs=cache.inputs[k], output_grads=s[k],
                           transposed=False) for k in range(self.n_layers)]

    # ------------------------------------------------------------- public API
    def loss(self, params, x, y):
        """Scalar mean loss L = (1/B) Σᵢ ℓᵢ."""
        xp = array_api_compat.array_namespace(x)
        return xp.mean(self._example_losses(self.forward(params, x), y))

    def batch(self, params, x, y, per_example: bool = False, layer_stats: bool = False,
              stat_targets=None) -> Batch:
        """Loss and gradient with optional statistics, from one forward pass.

        per_example_grads always use `y`; the layer statistics use `stat_targets` when given
        (labels sampled from the model: the "mc" Fisher), else `y`.
        """
        cache = self._forward(params, x)
        z = cache.outputs[-1]
        xp = array_api_compat.array_namespace(z)
        loss = xp.mean(self._example_losses(z, y))
        s = self._backward(params, cache, self._output_grad(z, y))
        grads = self._grads(cache, s)
        pe = self._per_example(cache, s) if per_example else None
        layers = None
        if layer_stats:
            s_stat = s if stat_targets is None else self._backward(
                params, cache, self._output_grad(z, stat_targets, "stat_targets"))
            layers = self._layer_stats(cache, s_stat)
        return Batch(loss, grads, pe, layers)

    def grad(self, params, x, y) -> list:
        """dL/dθ, a list like params."""
        return self.batch(params, x, y).grads

    def hvp(self, params, x, y, v) -> list:
        """Exact Hessian-vector product H v of the mean loss (Pearlmutter's R-operator)."""
        layers = self._layers(params)
        vl = self._layers(v)
        cache = self._forward(params, x)
        z = cache.outputs[-1]
        xp = array_api_compat.array_namespace(z)
        # forward R pass: Rz_k = R(a_k) W_kᵀ + a_k V_kᵀ + Vb_k, R(a_{k+1}) = act'(z_k) Rz_k
        ra = None
        rz_all: list = []
        ra_all: list = []
        for k, ((w, _), (vw, vb)) in enumerate(zip(layers, vl)):
            rz = cache.inputs[k] @ xp.matrix_transpose(vw)
            if ra is not None:
                rz = rz + ra @ xp.matrix_transpose(w)
            if vb is not None:
                rz = rz + vb
            ra_all.append(ra)
            rz_all.append(rz)
            if k < self.n_layers - 1:
                ra = cache.d1[k] * rz
        # backward pass of the R quantities
        s = self._backward(params, cache, self._output_grad(z, y))
        n = z.shape[0]
        rs = self._output_hvp(z, y, rz_all[-1])
        per_layer: list = [None] * self.n_layers
        for k in range(self.n_layers - 1, -1, -1):
            hw = xp.matrix_transpose(rs) @ cache.inputs[k]
            if ra_all[k] is not None:
                hw = hw + xp.matrix_transpose(s[k]) @ ra_all[k]
            per_layer[k] = (hw / n, xp.sum(rs, axis=0) / n if self.bias else None)
            if k > 0:
                w, vw = layers[k][0], vl[k][0]
                back = s[k] @ w
                rs_new = (rs @ w + s[k] @ vw) * cache.d1[k - 1]
                if cache.d2[k - 1] is not None:
                    rs_new = rs_new + back * cache.d2[k - 1] * rz_all[k - 1]
                rs = rs_new
        return self._leaves(per_layer)

    def stats(self, params, x, y, kind: str = "layers", stat_targets=None) -> Stats:
        """Curvature statistics; all of them use `stat_targets` when given, else `y`."""
        if kind not in STATS_KINDS:
            raise ValueError(f"kind must be one of {STATS_KINDS}, got {kind!r}")
        cache = self._forward(params, x)
        targets, what = (y, "y") if stat_targets is None else (stat_targets, "stat_targets")
        s = self._backward(params, cache, self._output_grad(cache.outputs[-1], targets, what))
        pe = self._per_example(cache, s) if kind in ("per_example", "both") else None
        layers = self._layer_stats(cache, s) if kind in ("layers", "both") else None
        return Stats(per_example_grads=pe, layers=layers)

    def oracle(self, x, y, rows: bool = False) -> Oracle:
        """grad_fn and hvp_fn on this batch; `rows`: also grad_rows_fn, the gradient with
        its pass's K-FAC rows (the factored finite-difference ĝ, ALGORITHMS.md §2.1)."""
        def grad_rows(p):
            b = self.batch(p, x, y, layer_stats=True)
            return b.grads, Stats(layers=b.layers)

        return Oracle(grad_fn=lambda p: self.grad(p, x, y),
                      hvp_fn=lambda p, v: self.hvp(p, x, y, v),
                      grad_rows_fn=grad_rows if rows else None)

    def sample_targets(self, params, x, seed: int):
        """Targets drawn from the model's predictive distribution (host RNG, not traceable).

        softmax_ce: one-hot rows of labels ~ Categorical(softmax(z)); mse: z + N(0, I).
        Returned in x's library, device and dtype.
        """
        z = self.forward(params, x)
        rng = np.random.default_rng(seed)
        if self.loss_name == "softmax_ce":
            xp = array_api_compat.array_namespace(z)
            p = to_numpy(xp.exp(self._log_softmax(xp, z))).astype(np.float64)
            u = rng.random((p.shape[0], 1))
            idx = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)
            return from_numpy(np.eye(p.shape[1])[idx], like=x)
        noise = rng.standard_normal(tuple(z.shape))
        xp = array_api_compat.array_namespace(x)
        return xp.astype(z, x.dtype) + from_numpy(noise, like=x)
