"""The oracle's passes of one step computed ahead of the step (ALGORITHMS.md §1: ĝ's extra
gradients and Hessian-vector products), for an adapter that runs the step itself inside a
branch (grng_jax's `lax.switch` over the refresh flags).

Why: the regularized gradient ĝ does not depend on the refresh flags, and XLA:CPU runs
convolution gradients about 7x (input) to 14x (kernel) slower inside a conditional branch
than outside it (`python -m benchmarks.xla_cond_conv`): a jitted RENG step of a small flax
CNN took 228.6 ms with its Hessian-vector product inside the branch and 25.7 ms with it
hoisted (`python -m benchmarks.jax_cnn_step --algorithm reng`; README "JAX (optax)").
`hoist` runs the estimator once, outside, with an oracle that records what each call
returns; `Hoisted.replay()` gives each traced branch an oracle that returns those results in
the same order (the estimator calls the oracle in an order fixed by the configuration, not by
the arrays), so the branches hold no oracle pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from grng_core.types import Oracle, Stats


class Hoisted(NamedTuple):
    """The results of the oracle calls one step makes, in call order, per function."""

    oracle: Oracle
    grad: tuple
    hvp: tuple

    def replay(self) -> Oracle:
        """An oracle returning the recorded results (one fresh cursor per traced branch); a
        call beyond the recorded ones falls through to the real oracle."""
        cursor = {"grad": 0, "hvp": 0}

        def take(kind: str, recorded: tuple, real):
            def fn(*args):
                k = cursor[kind]
                cursor[kind] = k + 1
                return recorded[k] if k < len(recorded) else real(*args)
            fn.__name__ = getattr(real, "__name__", kind)
            return fn

        o = self.oracle
        return o._replace(
            grad_fn=None if o.grad_fn is None else take("grad", self.grad, o.grad_fn),
            hvp_fn=None if o.hvp_fn is None else take("hvp", self.hvp, o.hvp_fn))


def hoist(core, grads, state, params, oracle: Oracle | None,
          collective=None) -> Hoisted | None:
    """Run `core`'s estimator of ĝ now with a recording oracle (None where the step calls no
    oracle: RING, ρ = 0, or an oracle with rows or an `along_fn`, whose passes also feed the
    K-FAC structure)."""
    if oracle is None or oracle.grad_rows_fn is not None or oracle.along_fn is not None:
        return None
    calls: dict[str, list[Any]] = {"grad": [], "hvp": []}

    def record(kind: str, fn):
        def rec(*args):
            out = fn(*args)
            calls[kind].append(out)
            return out
        rec.__name__ = getattr(fn, "__name__", kind)
        return rec

    probe = oracle._replace(
        grad_fn=None if oracle.grad_fn is None else record("grad", oracle.grad_fn),
        hvp_fn=None if oracle.hvp_fn is None else record("hvp", oracle.hvp_fn))
    env, _ = core._env(grads, state, params, Stats(), probe, collective, (False, False, None),
                       None)
    env.regularized_gradient()
    if not calls["grad"] and not calls["hvp"]:
        return None
    return Hoisted(oracle, tuple(calls["grad"]), tuple(calls["hvp"]))
