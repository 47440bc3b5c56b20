"""The adapter's machinery: optax composition (chain, inject_hyperparams, schedules), the pytree
state (checkpointing), dtypes, layer registration and its fallbacks, the refresh branches,
fisher="mc", and the errors a user meets."""

from __future__ import annotations

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from grng_jax import _collect

from tests import cases
from tests.jax import _problems as P

SIZES = (5, 6, 3)
B = 12
# K-FAC inverses by Cholesky here: the same inverse as Newton–Schulz, compiled several times
# faster (the core unrolls its Newton–Schulz budget into the graph).
CH = dict(inverse_method="cholesky")


def _batch(dtype=jnp.float64, seed=1):
    x = jax.random.normal(jax.random.PRNGKey(seed), (B, SIZES[0]), dtype)
    return x, jnp.arange(B) % SIZES[-1]


def _train(opt, params, batch, steps, loss_fn=P.softmax_ce, **extra):
    step = jax.jit(P.make_step(opt, loss_fn, **extra))
    state = opt.init(params)
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    return params, state, losses


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ------------------------------------------------------------------ optax composition
def test_chain_with_clipping_equals_clipping_by_hand():
    params, batch = P.mlp_params(SIZES), _batch()
    chained = optax.chain(optax.clip_by_global_norm(0.1), grng_jax.ring(0.1, rho=0.05, **CH))
    got, _, _ = _train(chained, params, batch, 3)

    ring = grng_jax.ring(0.1, rho=0.05, **CH)
    clip = optax.clip_by_global_norm(0.1)

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(P.softmax_ce)(p, batch)
        g, _ = clip.update(g, clip.init(p))
        u, s = ring.update(g, s, p, loss_fn=P.softmax_ce, batch=batch)
        return optax.apply_updates(p, u), s

    p, s = params, ring.init(params)
    for _ in range(3):
        p, s = step(p, s, batch)
    # two compiled programs: XLA may fuse (and round) them differently on another CPU
    assert _max_diff(got, p) < 1e-12


def test_inject_hyperparams_schedule_equals_a_schedule_callable():
    params, batch = P.mlp_params(SIZES), _batch()
    sched = optax.linear_schedule(0.2, 0.02, transition_steps=4)
    injected = optax.inject_hyperparams(grng_jax.reng)(
        learning_rate=sched, rho=0.05, damping=1e-2, structure="kfac", **CH)
    direct = grng_jax.reng(sched, rho=0.05, damping=1e-2, structure="kfac", **CH)
    p1, s1, _ = _train(injected, params, batch, 5)
    p2, _, _ = _train(direct, params, batch, 5)
    assert _max_diff(p1, p2) < 1e-12
    assert float(s1.hyperparams["learning_rate"]) == pytest.approx(float(sched(4)))


def test_inject_hyperparams_can_be_changed_in_the_state():
    params, batch = P.mlp_params(SIZES), _batch()
    opt = optax.inject_hyperparams(grng_jax.ring, static_args=("momentum",))(
        learning_rate=0.1, rho=0.05, damping=1e-2, momentum=0.5, structure="diagonal")
    step = jax.jit(P.make_step(opt, P.softmax_ce))
    state = opt.init(params)
    p, state, _ = step(params, state, batch)
    state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
    p2, state, _ = step(p, state, batch)  # lr 0: no move
    assert _max_diff(p, p2) == 0.0
    assert step._cache_size() == 1


def test_kl_clip_schedule_and_injection():
    """kl_clip as an optax schedule (called with the update count, 0 first) equals, step for
    step, runs with the constant that is the schedule's value there; inf from a schedule turns
    the trust region off (= kl_clip=inf); inject_hyperparams injects it, changeable in the
    state without a recompile."""
    params, batch = P.mlp_params(SIZES), _batch()
    kw = dict(rho=0.05, damping=1e-2, structure="kfac", **CH)
    tight, off = 1e-6, float("inf")  # the trust region binds at 1e-6 on this problem
    switch = lambda count: jnp.where(count < 2, tight, off)
    p_sched, _, _ = _train(grng_jax.ring(0.1, kl_clip=switch, **kw), params, batch, 4)
    p_ref, s_ref, _ = _train(grng_jax.ring(0.1, kl_clip=tight, **kw), params, batch, 2)
    step_off = jax.jit(P.make_step(grng_jax.ring(0.1, kl_clip=off, **kw), P.softmax_ce))
    for _ in range(2):  # the same state, continued without the trust region
        p_ref, s_ref, _ = step_off(p_ref, s_ref, batch)
    assert _max_diff(p_sched, p_ref) < 1e-12
    p_tight, _, _ = _train(grng_jax.ring(0.1, kl_clip=tight, **kw), params, batch, 4)
    assert _max_diff(p_sched, p_tight) > 1e-6  # the schedule did change the later steps
    opt = optax.inject_hyperparams(grng_jax.ring)(learning_rate=0.1, kl_clip=tight, **kw)
    step = jax.jit(P.make_step(opt, P.softmax_ce))
    state = opt.init(params)
    p, state, _ = step(params, state, batch)
    p_inj, _, _ = step(p, state, batch)
    assert _max_diff(p_inj, _train(grng_jax.ring(0.1, kl_clip=tight, **kw), params, batch,
                                   2)[0]) < 1e-12
    state.hyperparams["kl_clip"] = jnp.asarray(1e-8, state.hyperparams["kl_clip"].dtype)
    p_small, _, _ = step(p, state, batch)
    assert _max_diff(p_small, p) < _max_diff(p_inj, p)  # a tighter region: a shorter step
    assert step._cache_size() == 1


def test_inject_hyperparams_of_a_static_hyperparameter_names_static_args():
    opt = optax.inject_hyperparams(grng_jax.ring)(learning_rate=0.1, momentum=0.5)
    params, batch = P.mlp_params(SIZES), _batch()
    state = opt.init(params)  # concrete values: accepted
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(P.make_step(opt, P.softmax_ce))(params, state, batch)


# ----------------------------------------------------------------------- state, dtypes
def test_state_is_a_pytree_of_arrays():
    params = P.mlp_params(SIZES)
    for opt in (grng_jax.reng(0.1), grng_jax.ring(0.1, structure="woodbury"),
                grng_jax.rkalman(0.5, structure="kfac")):
        state = opt.init(params)
        leaves = jax.tree.leaves(state)
        assert leaves and all(isinstance(x, jax.Array) for x in leaves)
        assert state.core.step.dtype == jnp.int32


def test_bfloat16_params_keep_float32_state_and_train():
    params = P.mlp_params(SIZES, dtype=jnp.bfloat16)
    batch = _batch(jnp.bfloat16)
    opt = grng_jax.ring(0.1, rho=0.05, damping=1e-2, kl_clip=float("inf"), **CH)
    p, state, losses = _train(opt, params, batch, 10)
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    floats = {x.dtype for x in jax.tree.leaves(state.core) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
    assert losses[-1] < 0.7 * losses[0]


def test_float32_params_give_float32_updates_and_state():
    params = P.mlp_params(SIZES, dtype=jnp.float32)
    opt = grng_jax.reng(0.1, structure="woodbury")
    p, state, _ = _train(opt, params, _batch(jnp.float32), 2)
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
    assert state.core.skipped == 0


def test_eager_update_equals_jitted_update():
    """Without jit the core sees concrete values (early-stopping loops, host checks)."""
    params, batch = P.mlp_params(SIZES), _batch()
    opt = grng_jax.reng(0.1, rho=0.05, structure="kfac", gr="finite_difference", **CH)
    eager = P.make_step(opt, P.softmax_ce)
    pa, sa, _ = eager(params, opt.init(params), batch)
    pb, sb, _ = jax.jit(eager)(params, opt.init(params), batch)
    # two compiled programs (XLA fuses the in-graph Newton–Schulz loop of "where" differently):
    # rounding-level agreement, an order above float64's resolution after 8 steps
    assert _max_diff(pa, pb) < 1e-11
    assert _max_diff(sa, sb) < 1e-11


# -------------------------------------------------------------------- refresh branches
# K-FAC rows of the table (tests/cases.py), each with its builder's estimator
REFRESH_CASES = cases.select(optimizer=("ring", "rkalman"), structure="kfac",
                             default_estimator=True, bare=True)


# warmup_rows=2: the first layer (12 rows >= 2·6) skips the warm-up, the second (2·7) not
@pytest.mark.parametrize("warmup,count,rows", [(0, 4, 10.0), (3, 5, None), (3, 5, 2.0)])
@pytest.mark.parametrize("case", REFRESH_CASES, ids=[c.optimizer for c in REFRESH_CASES])
def test_switch_and_where_refresh_give_the_same_steps(case, warmup, count, rows):
    """The refresh warm-up (§2.1: every step refreshes during it; with warmup_rows, only for
    the layers with few rows) in both refresh modes."""
    params, batch = P.mlp_params(SIZES), _batch()
    kw = dict(curvature_every=2, inverse_every=3, inverse_method="cholesky",
              refresh_warmup=warmup, warmup_rows=rows)
    make = case.jax
    pa, sa, _ = _train(make(0.1, refresh="switch", **kw), params, batch, 7)
    pb, sb, _ = _train(make(0.1, refresh="where", **kw), params, batch, 7)
    if rows == 2.0:  # the first layer's S (its A: the same batch) differs from all warming
        _, sc, _ = _train(make(0.1, refresh="where", **{**kw, "warmup_rows": None}), params,
                          batch, 7)
        assert _max_diff(sa.core.curvature.kfac[0].S, sc.core.curvature.kfac[0].S) > 1e-6
    # two compiled programs (XLA fuses the in-graph Newton–Schulz loop of "where" differently):
    # rounding-level agreement, an order above float64's resolution after 8 steps
    assert _max_diff(pa, pb) < 1e-11
    assert _max_diff(sa, sb) < 1e-11
    # steps 1, 3, 5, 7; with a warm-up of 3: 1, 2, 3, 5, 7
    assert int(sa.core.curvature_count) == int(sb.core.curvature_count) == count


@pytest.mark.parametrize("form,decomposition,products,ratio", [
    ("gauss_newton", "cholesky", 4, 4), ("adaptive_damping", "eigh", 8, 2)])
def test_non_refresh_steps_collect_nothing(form, decomposition, products, ratio):
    """With lax.switch the statistics pass and the inversions (adaptive_damping: the
    eigendecompositions, §3.2) sit in the refresh branch only."""
    params, batch = P.mlp_params(SIZES), _batch()
    opt = grng_jax.ring(0.1, curvature_every=4, inverse_every=4, form=form,
                        kl_clip=float("inf"))  # the step's own work only
    jaxpr = jax.make_jaxpr(P.make_step(opt, P.softmax_ce))(params, opt.init(params), batch)
    from jax.extend import core as jax_core

    def prims(jaxpr):
        out = set()
        for e in jaxpr.eqns:
            out.add(e.primitive.name)
            for sub in jax_core.jaxprs_in_params(e.params):
                out |= prims(sub)
        return out

    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    # the refresh switch, and the skip report (a debug callback run only on a skipped step)
    assert len(conds) == 2
    report = [c for c in conds if "debug_callback" in prims(c.params["branches"][1].jaxpr)]
    assert len(report) == 1
    (switch,) = [c for c in conds if c is not report[0]]
    # the flag pairs in order of the period: (True, True), then (False, False), then the
    # warm-up's (True, True) with the layers that skip it on (False, False) (§2.1)
    refresh, plain, warm = switch.params["branches"]
    # the inversions (Cholesky by default, inverse_method="auto") and the statistics pass are
    # in the refresh branches only

    assert decomposition in prims(refresh.jaxpr) and decomposition in prims(warm.jaxpr)
    assert decomposition not in prims(plain.jaxpr)
    assert len(plain.jaxpr.eqns) * ratio < len(refresh.jaxpr.eqns)
    dots = [e for e in plain.jaxpr.eqns if e.primitive.name == "dot_general"]
    # S⁻¹ G A⁻¹ for the two layers (in the eigenbases: Q_Sᵀ G Q_A, then back), nothing else
    assert len(dots) <= products


# ------------------------------------------------------------------ layer registration
def _named_params(seed=0):
    """Weights not named kernel/bias: layers="auto" finds nothing."""
    layers = P.mlp_params(SIZES, seed=seed)
    return {"w1": layers[0]["kernel"], "b1": layers[0]["bias"],
            "w2": layers[1]["kernel"], "b2": layers[1]["bias"]}


def _named_loss(params, batch):
    h = jnp.tanh(grng_jax.dense(batch[0], params["w1"], params["b1"]))
    z = grng_jax.dense(h, params["w2"], params["b2"])
    return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()


def test_model_exposing_no_layer_falls_back_to_diagonal():
    params, batch = _named_params(), _batch()
    kfac = grng_jax.ring(0.1, damping=0.3)  # structure "kfac", nothing named kernel
    diag = grng_jax.ring(0.1, damping=0.3, structure="diagonal")
    assert kfac.init(params).core.curvature.kfac is None
    pa, _, _ = _train(kfac, params, batch, 3, loss_fn=_named_loss)
    pb, _, _ = _train(diag, params, batch, 3, loss_fn=_named_loss)
    # the same steps; two compiled programs, so equal to round-off (not bit for bit)
    assert _max_diff(pa, pb) < 1e-12
    wood = grng_jax.ring(0.1, fallback="woodbury")
    pc, _, _ = _train(wood, params, batch, 2, loss_fn=_named_loss)
    pd, _, _ = _train(grng_jax.ring(0.1, structure="woodbury"), params, batch, 2,
                      loss_fn=_named_loss)
    assert _max_diff(pc, pd) < 1e-12


def test_find_layers_registers_any_names():
    params, batch = _named_params(), _batch()
    found = grng_jax.find_layers(_named_loss, params, batch)
    assert found == [grng_jax.Layer(("w1",), ("b1",)), grng_jax.Layer(("w2",), ("b2",))]
    explicit = grng_jax.ring(0.1, layers=found, **CH)
    state = explicit.init(params)
    assert len(state.core.curvature.kfac) == 2
    # the same run as the auto-registered kernel/bias model with the same weights
    auto_params = P.mlp_params(SIZES)
    pa, _, _ = _train(explicit, params, batch, 3, loss_fn=_named_loss)
    pb, _, _ = _train(grng_jax.ring(0.1, **CH), auto_params, batch, 3)
    assert float(jnp.max(jnp.abs(pa["w1"] - pb[0]["kernel"]))) < 1e-12
    assert float(jnp.max(jnp.abs(pa["b2"] - pb[1]["bias"]))) < 1e-12


def test_layers_given_by_path_strings_and_none():
    params = _named_params()
    opt = grng_jax.reng(0.1, layers=[grng_jax.Layer("w1", "b1"), "w2"])
    kstate = opt.init(params).core.curvature.kfac
    assert len(kstate) == 2
    assert grng_jax.reng(0.1, layers=None).init(params).core.curvature.kfac is None
    with pytest.raises(ValueError, match="no params leaf"):
        grng_jax.reng(0.1, layers=["w3"]).init(params)


def test_declared_layer_not_called_through_a_tagged_dense_is_an_error():
    params, batch = P.mlp_params(SIZES), _batch()

    def untagged(p, batch):  # kernels named "kernel" but multiplied by hand
        h = jnp.tanh(batch[0] @ p[0]["kernel"] + p[0]["bias"])
        z = h @ p[1]["kernel"] + p[1]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()

    opt = grng_jax.ring(0.1, **CH)
    with pytest.raises(ValueError, match="grng_jax.dense"):
        jax.jit(P.make_step(opt, untagged))(params, opt.init(params), batch)


def test_shared_kernel_and_sequence_rows_are_concatenated():
    """A kernel used at two positions of a (B, T, d) input gives B*T rows per use."""
    layer = grng_jax.init_dense(jax.random.PRNGKey(0), 4, 4, dtype=jnp.float64)
    params = {"cell": layer, "out": grng_jax.init_dense(jax.random.PRNGKey(1), 4, 2,
                                                        dtype=jnp.float64)}
    x = jax.random.normal(jax.random.PRNGKey(2), (B, 3, 4))
    y = jnp.arange(B) % 2

    def loss_fn(p, batch):
        h = jnp.tanh(grng_jax.dense(batch[0], p["cell"]["kernel"], p["cell"]["bias"]))
        h = jnp.tanh(grng_jax.dense(h, p["cell"]["kernel"], p["cell"]["bias"]))  # shared
        z = grng_jax.dense(h.mean(axis=1), p["out"]["kernel"], p["out"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()

    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = [(1, 0), (3, 2)]  # flatten order: cell/bias, cell/kernel, out/bias, out/kernel
    stats = _collect.layer_stats(loss_fn, treedef, leaves, (x, y), specs)
    assert stats[0].inputs.shape == (2 * B * 3, 4) and stats[0].output_grads.shape == (2 * B * 3, 4)
    assert stats[1].inputs.shape == (B, 4)
    # the rows' s·a products add up to B times the batch gradient of the shared kernel
    g = jax.grad(loss_fn)(params, (x, y))
    assert jnp.allclose(stats[0].inputs.T @ stats[0].output_grads / B, g["cell"]["kernel"],
                        atol=1e-12)
    p, _, losses = _train(grng_jax.ring(0.1, **CH), params, (x, y), 3, loss_fn=loss_fn)
    assert losses[-1] < losses[0]


def test_dense_under_vmap_is_collected_and_under_scan_refused_by_name():
    params, batch = P.mlp_params(SIZES), _batch()
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def plain(p, batch):
        h = jnp.tanh(grng_jax.dense(batch[0], p[0]["kernel"], p[0]["bias"]))
        z = grng_jax.dense(h, p[1]["kernel"], p[1]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()

    def vmapped(p, batch):  # the first layer runs one example at a time under vmap
        h = jax.vmap(lambda x: jnp.tanh(grng_jax.dense(x, p[0]["kernel"], p[0]["bias"])))(
            batch[0])
        z = grng_jax.dense(h, p[1]["kernel"], p[1]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()

    def scanned(p, batch):  # the first layer inside lax.scan: cannot be collected
        def body(c, x):
            return c, jnp.tanh(grng_jax.dense(x, p[0]["kernel"], p[0]["bias"]))

        _, h = jax.lax.scan(body, 0.0, batch[0])
        z = grng_jax.dense(h, p[1]["kernel"], p[1]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()

    want = _collect.layer_stats(plain, treedef, leaves, batch, [(1, 0), (3, 2)])
    got = _collect.layer_stats(vmapped, treedef, leaves, batch, [(1, 0), (3, 2)])
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g.inputs), np.asarray(w.inputs), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g.output_grads), np.asarray(w.output_grads),
                                   rtol=1e-10, atol=1e-14)
    stats = _collect.layer_stats(scanned, treedef, leaves, batch, [(3, 2)])
    assert stats[0].inputs.shape == (B, SIZES[1])
    with pytest.raises(ValueError, match="used by a call inside lax.scan"):
        _collect.layer_stats(scanned, treedef, leaves, batch, [(1, 0)])


# --------------------------------------------------------------------------- Flax
def test_flax_dense_layers_are_found_and_match_the_plain_model():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.tanh(nn.Dense(SIZES[1])(x))
            return nn.Dense(SIZES[2])(x)

    model = MLP()
    batch = _batch()
    fparams = model.init(jax.random.PRNGKey(0), batch[0])["params"]

    def flax_loss(p, batch):
        z = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()

    plain = [dict(fparams["Dense_0"]), dict(fparams["Dense_1"])]
    opt = grng_jax.rkalman(0.5, structure="kfac", **CH)
    assert len(opt.init(fparams).core.curvature.kfac) == 2
    pa, _, _ = _train(opt, fparams, batch, 2, loss_fn=flax_loss)
    pb, _, _ = _train(opt, plain, batch, 2)
    assert _max_diff([pa["Dense_0"], pa["Dense_1"]], pb) < 1e-12


# --------------------------------------------------------------------------- fisher="mc"
def test_mc_fisher_samples_with_the_state_key():
    params, batch = P.mlp_params(SIZES), _batch()
    mc = grng_jax.mc_softmax_cross_entropy(lambda p, b: P.mlp_logits(p, b[0]))
    opt = grng_jax.ring(0.1, fisher="mc", seed=3, **CH)
    step = jax.jit(P.make_step(opt, P.softmax_ce, mc_loss_fn=mc))

    def run(state, steps=3):
        p = params
        for _ in range(steps):
            p, state, loss = step(p, state, batch)
        return p, state, float(loss)

    init = opt.init(params)
    pa, sa, loss = run(init)
    pb, _, _ = run(opt.init(params))
    pc, _, _ = run(init._replace(key=jax.random.PRNGKey(4)))
    assert _max_diff(pa, pb) == 0.0 and _max_diff(pa, pc) > 0.0
    assert not np.array_equal(np.asarray(sa.key), np.asarray(init.key))
    assert loss < float(P.softmax_ce(params, batch))
    assert step._cache_size() == 1


def test_mc_squared_error_draws_targets_around_the_prediction():
    params = P.mlp_params(SIZES)
    batch = (_batch()[0], jnp.zeros((B, SIZES[-1])))
    mc = grng_jax.mc_squared_error(lambda p, b: P.mlp_logits(p, b[0]))
    value, grads = jax.value_and_grad(mc)(params, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(value)) and all(jnp.all(jnp.isfinite(g))
                                             for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------ errors
def test_errors_name_what_is_missing():
    params, batch = P.mlp_params(SIZES), _batch()
    grads = jax.grad(P.softmax_ce)(params, batch)
    opt = grng_jax.reng(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match="loss_fn"):
        opt.update(grads, state, params)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(grads, state)
    with pytest.raises(ValueError, match="mc_loss_fn"):
        grng_jax.ring(0.1, fisher="mc").update(
            grads, grng_jax.ring(0.1, fisher="mc").init(params), params,
            loss_fn=P.softmax_ce, batch=batch)
    with pytest.raises(ValueError, match="rho"):
        grng_jax.ring(0.1, rho=10.0, damping=1.0, form="gauss_newton")
    with pytest.raises(ValueError, match="refresh"):
        grng_jax.ring(0.1, refresh="sometimes")
    with pytest.raises(ValueError, match="fallback"):
        grng_jax.ring(0.1, fallback="kfac")
    with pytest.raises(ValueError, match="structure"):
        grng_jax.rkalman(0.1, structure="dense")
    # diagonal RING needs neither loss_fn nor batch
    diag = grng_jax.ring(0.1, structure="diagonal")
    updates, _ = diag.update(grads, diag.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_builder_errors_name_the_keywords_of_grng_jax():
    """grng_jax spells the learning rate `learning_rate` (optax's name): `lr=` is refused with
    that hint and the list of arguments; a bad value is reported under the name passed."""
    with pytest.raises(TypeError, match=r"'lr'.*learning_rate.*its arguments: learning_rate, "):
        grng_jax.ring(lr=0.05)
    with pytest.raises(ValueError, match=r"^invalid learning_rate=-1: "):
        grng_jax.ring(learning_rate=-1)
    with pytest.raises(ValueError, match=r"^invalid rho=-1"):
        grng_jax.reng(rho=-1)
