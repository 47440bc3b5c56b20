"""The JAX rows of the step-cost microbenchmark (jitted): forward+backward, ``optax.adamw``,
``grng_jax`` RING kfac, the same RING written by hand in jax.numpy
(`benchmarks.stepcost_jaxref`) and ``kfac-jax``, on the JAX twin of the MLP, each where it runs.

The RING rows also time two refresh periods step by step (``block_until_ready`` after each):
the costliest step position that refreshes nothing against the median position, each
position's cost its least disturbed call (issue #11: <= 1.5x; `step_spread`)."""

from __future__ import annotations

import statistics
import time

from benchmarks.hyperparams import EMA_DECAY, MOMENTUM, REFRESH_EVERY
from benchmarks.losses import jax_xent
from benchmarks.models import jax_mlp_apply, torch_mlp_to_jax
from benchmarks.stepcost_setup import DAMPING, LR, make_batch, make_model, not_runnable, time_window

RHO = 0.05


def jax_results(b: int, steps: int, repeats: int) -> dict:
    """{key: {"label", "time" or "error", and the RING rows' per-step spread}} at batch ``b``."""
    try:
        return jax_rows(b, steps, repeats)
    except Exception as e:
        return {"jax": {"label": "JAX", "error": not_runnable(e)}}


def jax_rows(b: int, steps: int, repeats: int) -> dict:
    """The jitted JAX rows at batch ``b``: built and warmed up (one refresh period) together,
    then timed round-robin, ``repeats`` windows of ``steps`` steps each, keeping each row's
    best; then the RING rows' per-step spread. A failing row gets its error."""
    import jax
    import jax.numpy as jnp

    x, y = make_batch(b)
    batch = (jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
    params0 = torch_mlp_to_jax(make_model())
    vg = jax.jit(jax.value_and_grad(_loss))
    out = {"jax_fb": {"label": "forward+backward (jit)"}}
    runners = {"jax_fb": _Runner(lambda: jax.block_until_ready(vg(params0, batch)))}
    for key, label, build in (
            ("jax_adamw", "optax.adamw (jit)", _adamw),
            ("jax_ring", "grng_jax RING kfac, gauss_newton form (jit)", _grng_ring),
            ("jax_ring_ref", "RING kfac by hand in jax.numpy (jit, lax.cond)", _reference),
            ("jax_ring_host", "RING kfac by hand, refresh picked on the host (2 jits)",
             _host_reference),
            ("kfac_jax", "kfac-jax (jit)", _kfac_jax)):
        out[key] = {"label": label}
        try:
            runners[key] = build(params0, batch)
            runners[key].warm_up()
        except Exception as e:
            runners.pop(key, None)
            out[key]["error"] = _explain(key, e)
    _round_robin(runners, out, steps, repeats)
    for key, r in runners.items():
        if r.spread and "error" not in out[key]:
            out[key].update(step_spread(r.one, r.count, 2 * REFRESH_EVERY, repeats))
    return out


class _Runner:
    """One row's step (``one`` blocks until ready), its step count, whether to time its
    per-step spread."""

    def __init__(self, one, count=lambda: 0, spread: bool = False):
        self.one, self.count, self.spread = one, count, spread

    def warm_up(self):
        for _ in range(REFRESH_EVERY):  # one refresh period (and the compilation)
            self.one()


def _round_robin(runners: dict, out: dict, steps: int, repeats: int) -> None:
    best = dict.fromkeys(runners, float("inf"))
    runners["jax_fb"].one()
    for _ in range(repeats):
        for key, r in list(runners.items()):
            try:
                best[key] = min(best[key], time_window(r.one, steps, 1))
            except Exception as e:
                out[key]["error"] = not_runnable(e)
                del runners[key]
    for key in runners:
        out[key]["time"] = best[key]


def _loss(p, bt):
    return jax_xent(jax_mlp_apply(p, bt[0], "relu"), bt[1])


def step_spread(one, count, n: int, windows: int = 1) -> dict:
    """Time ``windows`` × ``n`` single calls of ``one`` (which blocks until ready); ``count()``
    is the number of steps taken before each call, its position in the refresh period
    count % REFRESH_EVERY (0: a refresh step). A position's cost is its least disturbed
    time, the minimum over its calls (as the windows of the mean step: a burst of other work
    on a shared machine slows one call, not every call of a position); {"max_plain": the
    costliest position that refreshes nothing, "median": the positions' median, "spread":
    their ratio, "max_plain_raw": the slowest single call that refreshed nothing,
    "step_times": every call's time}."""
    times, pos = [], []
    for _ in range(windows * n):
        pos.append(count() % REFRESH_EVERY)
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    cost: dict = {}
    for k, t in zip(pos, times):
        cost[k] = min(cost.get(k, t), t)
    plain = [t for k, t in cost.items() if k != 0]
    med = statistics.median(cost.values())
    top = max(plain) if plain else float("nan")
    raw = max((t for k, t in zip(pos, times) if k != 0), default=float("nan"))
    return {"max_plain": top, "median": med, "spread": top / med if med > 0 else float("nan"),
            "max_plain_raw": raw, "step_times": times}


def _optax(tx, extra: bool, params0, batch, spread: bool = False) -> _Runner:
    """The jitted step of an optax transformation; ``extra``: its update takes the loss
    function and the batch (grng_jax)."""
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

    st = {"p": params0, "s": tx.init(params0), "t": 0}

    def one():
        st["p"], st["s"] = step(st["p"], st["s"], batch)
        jax.block_until_ready(st["p"])
        st["t"] += 1

    return _Runner(one, lambda: st["t"], spread)


def _adamw(params0, batch) -> _Runner:
    import optax

    return _optax(optax.adamw(1e-3, weight_decay=1e-4), False, params0, batch)


def _grng_ring(params0, batch) -> _Runner:
    import grng_jax

    from benchmarks.stepcost_torch import gauss_newton_form

    # the hand-written reference's math: RING's gauss_newton form, d = (1 − ρλ)U + ρg
    tx = grng_jax.ring(LR, rho=RHO, damping=DAMPING, structure="kfac", momentum=MOMENTUM,
                       curvature_every=REFRESH_EVERY, inverse_every=REFRESH_EVERY,
                       ema_decay=EMA_DECAY, kl_clip=float("inf"), refresh_warmup=0,
                       **gauss_newton_form())
    return _optax(tx, True, params0, batch, spread=True)


def _reference(params0, batch) -> _Runner:
    """The hand-written RING (`stepcost_jaxref`) with the grng_jax row's hyperparameters."""
    import jax

    from benchmarks import stepcost_jaxref as ref

    step = jax.jit(ref.make_step(_ref_hyper()))
    st = {"p": params0, "s": ref.init(params0), "t": 0}

    def one():
        st["p"], st["s"], _ = step(st["p"], st["s"], batch)
        jax.block_until_ready(st["p"])
        st["t"] += 1

    return _Runner(one, lambda: st["t"], True)


def _host_reference(params0, batch) -> _Runner:
    """The hand-written RING with the refresh chosen on the host: two jitted steps."""
    import jax

    from benchmarks import stepcost_jaxref as ref

    fresh, plain = (jax.jit(f) for f in ref.make_host_steps(_ref_hyper()))
    st = {"p": params0, "s": ref.init(params0), "t": 0}

    def one():
        step = fresh if st["t"] % REFRESH_EVERY == 0 else plain
        st["p"], st["s"], _ = step(st["p"], st["s"], batch)
        jax.block_until_ready(st["p"])
        st["t"] += 1

    return _Runner(one, lambda: st["t"], True)


def _ref_hyper():
    from benchmarks.stepcost_jaxref import RefHyper

    return RefHyper(LR, RHO, DAMPING, MOMENTUM, EMA_DECAY, REFRESH_EVERY, "relu")


def _kfac_jax(params0, batch) -> _Runner:
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
        momentum_schedule=lambda t: MOMENTUM, damping_schedule=lambda t: DAMPING,
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

    return _Runner(kstep, lambda: st["t"])


def _explain(key: str, e: BaseException) -> str:
    """The row's note; kfac-jax's known incompatibility with this JAX is spelled out."""
    if key == "kfac_jax" and "too many values to unpack" in str(e):
        import importlib.metadata as md

        v = {d: md.version(d) for d in ("kfac-jax", "jax")}
        return (f"not runnable: kfac-jax {v['kfac-jax']} is incompatible with jax {v['jax']}: "
                "its tag_graph_matcher.eval_jaxpr_eqn unpacks `subfuns, params = "
                "eqn.primitive.get_bind_params(eqn.params)`, but this JAX's get_bind_params "
                "returns only the params dict (ValueError: too many values to unpack) - a "
                "kfac-jax/JAX version clash, not a benchmark bug")
    return not_runnable(e)
