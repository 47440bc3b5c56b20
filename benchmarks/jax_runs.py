"""JAX rows of the suite: ``optax.adamw`` and DeepMind's ``kfac-jax`` on the JAX twin of the MLP.

The JAX model is the same function as the torch ``mlp`` and starts from the same weights (copied
from the torch model built with the run's seed). Each step is one jitted function; the harness
blocks on its result, so the wall times are real. A step also returns the global norm of its
minibatch gradient (``optax.global_norm`` inside the jitted step; kfac-jax: its own statistic).
RING runs in both forms (``grng_jax.ring(..., form=...)``), as the torch rows do.
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.grng_runs import ring_rows
from benchmarks.hyperparams import (
    ADAMW_WD,
    EMA_DECAY,
    GRNG_BASE,
    KFAC_DAMPING,
    KFAC_LR,
    MOMENTUM,
    REFRESH_EVERY,
)
from benchmarks.losses import jax_xent
from benchmarks.optspec import OptSpec


class JaxStepper:
    """Parameters, optimizer state and one jitted step (loss, gradient norm, new params, new
    state)."""

    framework = "jax"
    step_grad_norm = math.nan  # this step's minibatch gradient norm
    probe_s = 0.0  # measured inside the jitted step: not separable from its time

    def __init__(self, params, apply, step_fn, opt_state):
        self.params, self.apply, self._step, self.opt_state = params, apply, step_fn, opt_state

    def step(self, x, y) -> float:
        loss, gnorm, self.params, self.opt_state = self._step(self.params, self.opt_state, x, y)
        self.step_grad_norm = float(gnorm)
        return float(loss)  # blocks until the step is done

    def logits(self, x) -> np.ndarray:
        return np.asarray(self.apply(self.params, x))

    def grad_norm(self, x, y) -> float:
        import jax
        import jax.numpy as jnp

        g = jax.grad(lambda p: jax_xent(self.apply(p, x), y))(self.params)
        return float(jnp.sqrt(sum(jnp.sum(t * t) for t in jax.tree_util.tree_leaves(g))))

    def state_arrays(self):
        import jax

        return [a for a in jax.tree_util.tree_leaves(self.opt_state) if hasattr(a, "nbytes")]


def jax_apply_for(task):
    import jax

    from benchmarks.models import jax_mlp_apply

    act = task.activation
    return jax.jit(lambda p, x: jax_mlp_apply(p, x, act))


def _optax_adamw(torch_model, task, hp, seed):
    import jax
    import optax

    from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax

    params = torch_mlp_to_jax(torch_model)
    tx = optax.adamw(hp["lr"], weight_decay=hp["weight_decay"])
    act = task.activation

    def loss_fn(p, x, y):
        return jax_xent(jax_mlp_apply(p, x, act), y)

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return loss, optax.global_norm(g), optax.apply_updates(p, u), s

    state = tx.init(params)
    _compile(step, params, state, task)
    return JaxStepper(params, jax_apply_for(task), step, state)


def _compile(step, params, state, task):
    """Run the jitted step once on a training-shaped batch and drop the result (the step is
    pure), so that compilation is not counted in the run's wall time."""
    import jax
    import jax.numpy as jnp

    a = task.arrays
    x0 = jnp.asarray(a.x_train[:task.batch_size])
    y0 = jnp.asarray(a.y_train[:task.batch_size])
    jax.block_until_ready(step(params, state, x0, y0))


def _kfac_jax(torch_model, task, hp, seed):
    import jax
    import kfac_jax

    from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax

    params = torch_mlp_to_jax(torch_model)
    act = task.activation

    def loss_fn(p, batch):
        x, y = batch
        logits = jax_mlp_apply(p, x, act)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return jax_xent(logits, y)

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
        use_adaptive_learning_rate=False, use_adaptive_momentum=False,
        use_adaptive_damping=False,
        learning_rate_schedule=lambda t: hp["lr"], momentum_schedule=lambda t: hp["momentum"],
        damping_schedule=lambda t: hp["damping"], curvature_ema=hp["ema_decay"],
        inverse_update_period=hp["refresh_every"],
        curvature_update_period=hp["refresh_every"], num_burnin_steps=0, multi_device=False,
        estimation_mode="fisher_empirical", include_norms_in_stats=True,
    )
    key = jax.random.PRNGKey(seed)
    a = task.arrays
    x0 = jax.numpy.asarray(a.x_train[:task.batch_size])
    y0 = jax.numpy.asarray(a.y_train[:task.batch_size])
    state = opt.init(params, key, (x0, y0))
    counter = {"t": 0, "key": key}

    def step(p, s, x, y):
        counter["key"], sub = jax.random.split(counter["key"])
        p, s, stats = opt.step(p, s, sub, batch=(x, y), global_step_int=counter["t"])
        counter["t"] += 1
        return stats["loss"], stats.get("grad_norm", math.nan), p, s

    stepper = JaxStepper(params, jax_apply_for(task), step, state)
    # kfac-jax traces the model on its first step: do it here so a failure names the package.
    stepper.step(x0, y0)
    stepper.params, stepper.opt_state, counter["t"] = params, state, 0
    return stepper


def _grng_jax(algo: str):
    """grng_jax's optax transformation (``ring`` / ``reng`` / ``rkalman``), jitted with the
    gradient; the K-FAC statistics come from the tagged ``grng_jax.dense`` layers."""

    def build(torch_model, task, hp, seed):
        import grng_jax
        import jax
        import optax

        from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax

        params = torch_mlp_to_jax(torch_model)
        act = task.activation
        kw = {k: v for k, v in hp.items() if k != "lr"}
        kw["structure"] = task.structures[algo]
        tx = getattr(grng_jax, algo)(hp["lr"], **kw)

        def loss_fn(p, batch):
            return jax_xent(jax_mlp_apply(p, batch[0], act), batch[1])

        @jax.jit
        def step(p, s, x, y):
            loss, g = jax.value_and_grad(loss_fn)(p, (x, y))
            u, s = tx.update(g, s, p, loss_fn=loss_fn, batch=(x, y))
            return loss, optax.global_norm(g), optax.apply_updates(p, u), s

        state = tx.init(params)
        _compile(step, params, state, task)
        return JaxStepper(params, jax_apply_for(task), step, state)

    return build


def specs() -> list[OptSpec]:
    jax_tasks = ("digits_mlp", "logreg")
    return [
        OptSpec("optax_adamw", "optax.adamw (JAX)", "jax", "baseline",
                {"lr": 5e-3, "weight_decay": ADAMW_WD}, _optax_adamw,
                requires=("jax", "optax"), tasks=jax_tasks),
        OptSpec("kfac_jax", "kfac-jax (JAX)", "jax", "peer",
                {"lr": KFAC_LR, "damping": KFAC_DAMPING, "momentum": MOMENTUM,
                 "refresh_every": REFRESH_EVERY, "ema_decay": EMA_DECAY}, _kfac_jax,
                requires=("jax", "kfac_jax"), tasks=jax_tasks,
                note=f"empirical Fisher; curvature and inverse every {REFRESH_EVERY} steps"),
        *ring_rows("grng_jax_ring", "jax", GRNG_BASE["ring"], _grng_jax("ring"),
                   variant="grng_jax", requires=("jax", "grng_jax"), tasks=jax_tasks,
                   full_only=True,
                   note="grng_jax's optax transformation, jitted with the gradient"),
    ]

