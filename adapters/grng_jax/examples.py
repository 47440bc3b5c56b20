"""Worked examples: an MLP on scikit-learn's digits, in plain jax.numpy and in Flax.

Run ``python -m grng_jax.examples`` (needs scikit-learn; Flax for the second example). Both
train with a jitted epoch (``lax.scan`` over minibatches) and any of the three optimizers.

Plain jax.numpy: the dense layers go through :func:`grng_jax.dense` and their params are
``{"kernel", "bias"}`` dicts (:func:`grng_jax.init_dense`), so ``structure="kfac"`` finds them
by name when the state is built and collects their statistics by the perturbation pass::

    def logits(params, x):
        for i, layer in enumerate(params):
            x = grng_jax.dense(x, layer["kernel"], layer["bias"])
            x = jnp.tanh(x) if i < len(params) - 1 else x
        return x

Flax (linen): nothing to change in the model; every ``nn.Dense`` is intercepted while the
statistics are collected, and its ``kernel``/``bias`` params are found by name::

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.tanh(nn.Dense(64)(x))
            return nn.Dense(10)(x)

    loss_fn = lambda params, batch: cross_entropy(model.apply({"params": params}, batch[0]),
                                                  batch[1])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import grng_jax

# Hyperparameters that train the digits MLP to >= 95% test accuracy within 20 epochs.
# K-FAC statistics and inverses are refreshed every 5 steps after the default warm-up (every
# step for the first 20): the lax.switch of the adapter skips both on the other steps.
DIGITS_HP: dict[str, dict[str, Any]] = {
    "reng": dict(learning_rate=0.1, rho=0.05, damping=1e-2, curvature_every=5, inverse_every=5),
    "ring": dict(learning_rate=0.1, rho=0.05, damping=1e-2, curvature_every=5, inverse_every=5),
    "rkalman": dict(learning_rate=0.5, rho=0.05, damping=1e-2),  # the kfac belief
}


def digits(seed: int = 0, dtype=jnp.float32):
    """(x_train, labels_train, x_test, labels_test) of sklearn's digits, pixels in [0, 1]."""
    from grng_core.reference import load_digits_split

    d = load_digits_split(seed=seed)
    return (jnp.asarray(d.x_train, dtype), jnp.asarray(d.labels_train, jnp.int32),
            jnp.asarray(d.x_test, dtype), jnp.asarray(d.labels_test, jnp.int32))


def mlp_init(key, sizes=(64, 64, 10), dtype=jnp.float32) -> list:
    keys = jax.random.split(key, len(sizes) - 1)
    return [grng_jax.init_dense(k, a, b, dtype=dtype)
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_logits(params, x):
    for i, layer in enumerate(params):
        x = grng_jax.dense(x, layer["kernel"], layer["bias"])
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class Trained(NamedTuple):
    """What :func:`train` returns."""

    params: Any
    accuracy: float  # on the test split, after the last epoch run
    losses: list[float]  # per-epoch mean training loss
    state: Any  # the optimizer state


def train(logits_fn: Callable, params, optimizer: optax.GradientTransformation, data, *,
          epochs: int = 20, batch_size: int = 64, seed: int = 0, mc: bool = False,
          until: float | None = None) -> Trained:
    """Minibatch training; returns the params, test accuracy, losses and optimizer state.

    logits_fn(params, x) -> logits. One jitted function runs a whole epoch (lax.scan over the
    shuffled minibatches); it compiles once. With `until`, training stops after the first
    epoch whose test accuracy reaches it.
    """
    x_tr, y_tr, x_te, y_te = data

    def loss_fn(p, batch):
        return cross_entropy(logits_fn(p, batch[0]), batch[1])

    extra = {}
    if mc:
        extra["mc_loss_fn"] = grng_jax.mc_softmax_cross_entropy(lambda p, b: logits_fn(p, b[0]))

    @jax.jit
    def epoch(params, state, xb, yb):
        def step(carry, batch):
            p, s = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, batch)
            updates, s = optimizer.update(grads, s, p, loss_fn=loss_fn, batch=batch, **extra)
            return (optax.apply_updates(p, updates), s), loss

        (params, state), losses = jax.lax.scan(step, (params, state), (xb, yb))
        return params, state, jnp.mean(losses)

    @jax.jit
    def accuracy(params):
        return jnp.mean(jnp.argmax(logits_fn(params, x_te), axis=-1) == y_te)

    state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    n_batches = x_tr.shape[0] // batch_size
    losses = []
    acc = 0.0
    for _ in range(epochs):
        idx = rng.permutation(x_tr.shape[0])[: n_batches * batch_size]
        idx = idx.reshape(n_batches, batch_size)
        params, state, loss = epoch(params, state, x_tr[idx], y_tr[idx])
        losses.append(float(loss))
        acc = float(accuracy(params))
        if until is not None and acc >= until:
            break
    return Trained(params, acc, losses, state)


def mlp_digits(algorithm: str = "ring", *, epochs: int = 20, seed: int = 0,
               dtype=jnp.float32, until: float | None = None,
               **hyperparams) -> tuple[float, int]:
    """(test accuracy, epochs run) of a 64-64-10 tanh MLP (plain jax.numpy) on digits."""
    hp = {**DIGITS_HP[algorithm], **hyperparams}
    opt = getattr(grng_jax, algorithm)(**hp)
    params = mlp_init(jax.random.PRNGKey(seed), dtype=dtype)
    run = train(mlp_logits, params, opt, digits(dtype=dtype), epochs=epochs, seed=seed,
                mc=hp.get("fisher") == "mc", until=until)
    return run.accuracy, len(run.losses)


def flax_mlp(hidden: int = 64, classes: int = 10):
    """A Flax linen MLP with plain nn.Dense layers (imported lazily: Flax is optional)."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.tanh(nn.Dense(hidden)(x))
            return nn.Dense(classes)(x)

    return MLP()


def flax_digits(algorithm: str = "ring", *, epochs: int = 20, seed: int = 0,
                until: float | None = None, **hyperparams) -> tuple[float, int]:
    """(test accuracy, epochs run) of the same MLP written in Flax linen, on digits."""
    hp = {**DIGITS_HP[algorithm], **hyperparams}
    opt = getattr(grng_jax, algorithm)(**hp)
    model = flax_mlp()
    data = digits()
    params = model.init(jax.random.PRNGKey(seed), data[0][:1])["params"]

    def logits_fn(p, x):
        return model.apply({"params": p}, x)

    run = train(logits_fn, params, opt, data, epochs=epochs, seed=seed, until=until)
    return run.accuracy, len(run.losses)


def main() -> None:  # pragma: no cover - a demo
    for algo in ("reng", "ring", "rkalman"):
        print(f"{algo:8s} jax.numpy MLP: test accuracy {mlp_digits(algo)[0]:.3f}")
    try:
        import flax  # noqa: F401
    except ImportError:
        return
    print(f"ring     Flax MLP:      test accuracy {flax_digits('ring')[0]:.3f}")


if __name__ == "__main__":  # pragma: no cover
    main()
