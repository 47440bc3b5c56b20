"""The JAX rows of the step-cost microbenchmark (jitted): forward+backward, ``optax.adamw``,
``grng_jax`` RING kfac and ``kfac-jax`` on the JAX twin of the MLP, each where it runs."""

from __future__ import annotations

from benchmarks.hyperparams import EMA_DECAY, REFRESH_EVERY
from benchmarks.losses import jax_xent
from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax
from benchmarks.stepcost_setup import DAMPING, LR, make_batch, make_model, not_runnable, time_window


def jax_results(b: int, steps: int, repeats: int) -> dict:
    """{key: {"label", "time" or "error"}} of the JAX rows at batch ``b``."""
    try:
        return {k: {"label": lab, "time": v} if isinstance(v, float) else
                {"label": lab, "error": v}
                for k, (lab, v) in jax_rows(b, steps, repeats).items()}
    except Exception as e:
        return {"jax": {"label": "JAX", "error": not_runnable(e)}}


def jax_rows(b: int, steps: int, repeats: int) -> dict:
    """{key: (label, seconds per step or error string)} of the jitted JAX rows."""
    import jax
    import jax.numpy as jnp

    x, y = make_batch(b)
    batch = (jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
    params0 = torch_mlp_to_jax(make_model())
    out = {}
    vg = jax.jit(jax.value_and_grad(_loss))
    jax.block_until_ready(vg(params0, batch))
    out["jax_fb"] = ("forward+backward (jit)", time_window(
        lambda: jax.block_until_ready(vg(params0, batch)), steps, repeats))
    for key, label, timer in (("jax_adamw", "optax.adamw (jit)", _adamw_time),
                              ("jax_ring", "grng_jax RING kfac (jit)", _grng_ring_time),
                              ("kfac_jax", "kfac-jax (jit)", _kfac_jax_time)):
        try:
            out[key] = (label, timer(params0, batch, steps, repeats))
        except Exception as e:
            out[key] = (label, not_runnable(e))
    return out


def _loss(p, bt):
    return jax_xent(jax_mlp_apply(p, bt[0], "relu"), bt[1])


def _optax_time(tx, extra: bool, params0, batch, steps: int, repeats: int) -> float:
    """Seconds per jitted step of an optax transformation, after one refresh period of
    warm-up; ``extra``: its update takes the loss function and the batch (grng_jax)."""
    import jax
    import optax

    # the batch is an argument, not a closure constant (XLA would constant-fold the
    # statistics of a constant batch at compile time)
    @jax.jit
    def step(p, s, bt):
        loss, g = jax.value_and_grad(_loss)(p, bt)
        if extra:
            u, s = tx.update(g, s, p, loss_fn=_loss, batch=bt)
        else:
            u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    st = {"p": params0, "s": tx.init(params0)}

    def one():
        st["p"], st["s"] = step(st["p"], st["s"], batch)
        jax.block_until_ready(st["p"])

    for _ in range(REFRESH_EVERY):
        one()
    return time_window(one, steps, repeats)


def _adamw_time(params0, batch, steps: int, repeats: int) -> float:
    import optax

    return _optax_time(optax.adamw(1e-3, weight_decay=1e-4), False, params0, batch, steps,
                       repeats)


def _grng_ring_time(params0, batch, steps: int, repeats: int) -> float:
    import grng_jax

    tx = grng_jax.ring(LR, rho=0.05, damping=DAMPING, structure="kfac", momentum=0.9,
                       curvature_every=REFRESH_EVERY, inverse_every=REFRESH_EVERY,
                       ema_decay=EMA_DECAY)
    return _optax_time(tx, True, params0, batch, steps, repeats)


def _kfac_jax_time(params0, batch, steps: int, repeats: int) -> float:
    import jax
    import kfac_jax

    def kloss(p, bt):
        logits = jax_mlp_apply(p, bt[0], "relu")
        kfac_jax.register_softmax_cross_entropy_loss(logits, bt[1])
        return jax_xent(logits, bt[1])

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(kloss), l2_reg=0.0,
        use_adaptive_learning_rate=False, use_adaptive_momentum=False,
        use_adaptive_damping=False, learning_rate_schedule=lambda t: LR,
        momentum_schedule=lambda t: 0.9, damping_schedule=lambda t: DAMPING,
        curvature_ema=EMA_DECAY, inverse_update_period=REFRESH_EVERY,
        curvature_update_period=REFRESH_EVERY, num_burnin_steps=0,
        multi_device=False, estimation_mode="fisher_empirical")
    key = jax.random.PRNGKey(0)
    st = {"p": params0, "s": opt.init(params0, key, batch), "t": 0}

    def kstep():
        st["p"], st["s"], _ = opt.step(st["p"], st["s"], key, batch=batch,
                                       global_step_int=st["t"])
        st["t"] += 1
        jax.block_until_ready(st["p"])

    for _ in range(REFRESH_EVERY):
        kstep()
    return time_window(kstep, steps, repeats)
