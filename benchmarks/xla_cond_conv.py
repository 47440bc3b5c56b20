"""XLA:CPU runs a convolution's input gradient about 7x slower inside `lax.cond` / `lax.switch`
than outside (jax 0.10.2): the transpose rule swaps the kernel's in/out axes through the
convolution's dimension numbers (kernel "01oi"), which the CPU backend leaves on a slow path
inside a conditional branch; the same gradient with the kernel flipped and transposed
explicitly (kernel "01io") is fast in both places. grng_jax runs its whole update inside
`lax.switch` (README "JAX (optax)"), so the backward passes of its own (the K-FAC statistics
pass on refresh steps, RENG's and R-Kalman's extra gradients) pay this on convolutional models.

    python -m benchmarks.xla_cond_conv
"""

from __future__ import annotations

import time


def main() -> None:
    import jax
    import jax.numpy as jnp
    from jax import lax

    def bench(f, *args, n=20):
        jax.block_until_ready(f(*args))
        t = time.perf_counter()
        for _ in range(n):
            r = f(*args)
        jax.block_until_ready(r)
        return (time.perf_counter() - t) / n * 1e3

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (64, 16, 16, 16))
    w = jax.random.normal(key, (3, 3, 16, 16)) * 0.1
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(x, w):
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
        return jnp.sum(jnp.tanh(y) ** 2)

    def by_hand(x, w):  # the same input gradient, the kernel flipped and transposed explicitly
        t = jnp.tanh(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))
        ct = 2 * t * (1 - t ** 2)
        wt = jnp.flip(w, (0, 1)).swapaxes(2, 3)
        return lax.conv_general_dilated(ct, wt, (1, 1), "SAME", dimension_numbers=dn)

    grad = jax.grad(loss)
    for name, fn in (("jax.grad", grad), ("by hand", by_hand)):
        outside = jax.jit(fn)
        inside = jax.jit(lambda flag, x, w, fn=fn: lax.cond(flag, lambda: fn(x, w),
                                                             lambda: jnp.zeros_like(x)))
        print(f"{name}: input gradient of a 3x3 conv, 64x16x16x16: {bench(outside, x, w):.2f} "
              f"ms under jit, {bench(inside, True, x, w):.2f} ms inside lax.cond")


if __name__ == "__main__":
    main()
