"""K-FAC RING written by hand in jax.numpy: the reference the jitted ``grng_jax.ring`` row is
timed against (issue #11: grng_jax's step <= 1.2x this one).

The same math and hyperparameters as the grng_jax row (ALGORITHMS.md §2.1, §3.2): curvature and
inverses every ``every`` steps (the step count before the step is a multiple of ``every``).
Every step runs one forward+backward with a zero perturbation added to every layer's output:
it gives the gradient, the layer inputs a and the output gradients dL/dz at once (rows
s = B dL/dz; no extra pass). On refresh steps (``lax.cond``), per layer: the EMA factors
A = a'ᵀa'/B (a' = [a, 1]) and S = sᵀs/B (the first update takes the batch's), the π-split
damping (A + π√λ I, S + √λ/π I, π = √((tr A/d_A)/(tr S/d_S)) clipped to [1e-4, 1e4]) and
Cholesky inverses. Every step: U = S⁻¹ G A⁻¹ (G = [Kᵀ | b], dense), the RING direction
d = (1 − ρλ) U + ρ g, momentum m = μ m + d and θ ← θ − η m.
"""

from __future__ import annotations

from typing import NamedTuple

from benchmarks.losses import jax_xent


class RefHyper(NamedTuple):
    lr: float
    rho: float
    damping: float
    momentum: float
    ema_decay: float
    every: int
    activation: str = "relu"


def _act(name):
    import jax

    return {"relu": jax.nn.relu, "tanh": jax.numpy.tanh}[name]


def forward(params, x, perturbs, activation: str):
    """(logits, layer inputs) of the MLP ``[{"kernel": (d_in, d_out), "bias"}, ...]``, with
    ``perturbs[i]`` added to layer i's output (None: nothing added)."""
    act, inputs, h = _act(activation), [], x
    for i, layer in enumerate(params):
        inputs.append(h)
        h = h @ layer["kernel"] + layer["bias"]
        if perturbs is not None:
            h = h + perturbs[i]
        if i < len(params) - 1:
            h = act(h)
    return h, inputs


def loss_grad_rows(params, batch, activation: str):
    """(loss, gradient, inputs a, output gradients dL/dz) by one forward+backward."""
    import jax
    import jax.numpy as jnp

    x, y = batch
    zeros = [jnp.zeros((x.shape[0], layer["bias"].shape[0]), x.dtype) for layer in params]

    def f(p, e):
        logits, inputs = forward(p, x, e, activation)
        return jax_xent(logits, y), inputs

    (loss, inputs), (g, dz) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, zeros)
    return loss, g, inputs, dz


def _cholesky_inverse(M):
    import jax.numpy as jnp
    from jax.scipy.linalg import solve_triangular

    L = jnp.linalg.cholesky(M)
    Li = solve_triangular(L, jnp.eye(M.shape[0], dtype=M.dtype), lower=True)
    X = Li.T @ Li
    return 0.5 * (X + X.T)


def _damped_inverses(A, S, damping):
    import jax.numpy as jnp

    ratio = (jnp.trace(A) / A.shape[0]) / (jnp.trace(S) / S.shape[0])
    pi = jnp.clip(jnp.sqrt(ratio), 1e-4, 1e4)
    root = jnp.sqrt(jnp.asarray(damping, A.dtype))
    return (_cholesky_inverse(A + pi * root * jnp.eye(A.shape[0], dtype=A.dtype)),
            _cholesky_inverse(S + root / pi * jnp.eye(S.shape[0], dtype=S.dtype)))


def _refresh(factors, inputs, dz, first, hp: RefHyper):
    """New (A, S, A⁻¹, S⁻¹) per layer from this batch's rows."""
    import jax.numpy as jnp

    out = []
    for (A0, S0, _, _), a, d in zip(factors, inputs, dz):
        n = a.shape[0]
        a1 = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1)
        s = d * n
        A_hat, S_hat = a1.T @ a1 / n, s.T @ s / n
        A = jnp.where(first, A_hat, hp.ema_decay * A0 + (1 - hp.ema_decay) * A_hat)
        S = jnp.where(first, S_hat, hp.ema_decay * S0 + (1 - hp.ema_decay) * S_hat)
        out.append((A, S, *_damped_inverses(A, S, hp.damping)))
    return out


def init(params):
    """Zero factors, identity inverses, zero momentum, step and refresh counts 0."""
    import jax
    import jax.numpy as jnp

    factors = []
    for layer in params:
        d_in, d_out = layer["kernel"].shape
        f32 = layer["kernel"].dtype
        factors.append((jnp.zeros((d_in + 1, d_in + 1), f32), jnp.zeros((d_out, d_out), f32),
                        jnp.eye(d_in + 1, dtype=f32), jnp.eye(d_out, dtype=f32)))
    return {"factors": factors, "m": jax.tree_util.tree_map(jnp.zeros_like, params),
            "t": jnp.zeros((), jnp.int32), "k": jnp.zeros((), jnp.int32)}


def _step(params, st, batch, refresh, hp: RefHyper):
    """One step; ``refresh`` a traced bool (``lax.cond``) or a Python bool (no branch)."""
    from jax import lax

    loss, g, inputs, dz = loss_grad_rows(params, batch, hp.activation)

    def new(factors):
        return _refresh(factors, inputs, dz, st["k"] == 0, hp)

    if isinstance(refresh, bool):
        factors = new(st["factors"]) if refresh else st["factors"]
    else:
        factors = lax.cond(refresh, new, lambda f: f, st["factors"])
    new_p, new_m = _ring_update(params, g, st["m"], factors, hp)
    k = st["k"] + (int(refresh) if isinstance(refresh, bool) else refresh.astype(st["k"].dtype))
    return new_p, {"factors": factors, "m": new_m, "t": st["t"] + 1, "k": k}, loss


def make_step(hp: RefHyper):
    """``step(params, state, batch) -> (params, state, loss)`` (jit it): the refresh is
    decided in the graph from the step count (``lax.cond``), as an optax transformation must."""

    def step(params, st, batch):
        return _step(params, st, batch, st["t"] % hp.every == 0, hp)

    return step


def make_host_steps(hp: RefHyper):
    """(refresh step, plain step), to jit separately and pick on the host by a Python step
    count: no conditional in the graph (a hand-written loop can do this; an optax
    transformation, whose step count lives in its state, cannot)."""
    return (lambda p, st, bt: _step(p, st, bt, True, hp),
            lambda p, st, bt: _step(p, st, bt, False, hp))


def _ring_update(params, g, m, factors, hp: RefHyper):
    """U = S⁻¹ G A⁻¹, d = (1 − ρλ)U + ρg, m = μm + d, θ − ηm per layer."""
    import jax.numpy as jnp

    c = 1.0 - hp.rho * hp.damping
    new_p, new_m = [], []
    for p, gl, ml, (_, _, Ai, Si) in zip(params, g, m, factors):
        d_in = p["kernel"].shape[0]
        G = jnp.concatenate([gl["kernel"].T, gl["bias"][:, None]], axis=1)
        U = Si @ G @ Ai
        d = {"kernel": c * U[:, :d_in].T + hp.rho * gl["kernel"],
             "bias": c * U[:, d_in] + hp.rho * gl["bias"]}
        mm = {k: hp.momentum * ml[k] + d[k] for k in d}
        new_m.append(mm)
        new_p.append({k: p[k] - hp.lr * mm[k] for k in p})
    return new_p, new_m
