"""What a JAX user's ordinary mistakes and models get instead of a raw JAX or flax error, or
silence: a weight tied by a hand-written matmul (a warning at the first step, the check
grng_torch makes, `grng_jax._explained`), a loss with auxiliary outputs, a layer type whose
rows grng_jax does not read (flax.linen ConvTranspose, Einsum), an nnx.Optimizer over a `wrt`
subset with nnx_loss_fn's default, a setting passed in the batch."""

import warnings

import flax.linen as fnn
import grng_jax
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

X = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
IDS = jax.random.randint(jax.random.PRNGKey(1), (16, 5), 0, 11)


class TinyLM(fnn.Module):
    tied_by_hand: bool

    @fnn.compact
    def __call__(self, ids):
        wte = fnn.Embed(11, 8, name="wte")
        h = jnp.tanh(fnn.Dense(8)(wte(ids)))
        if self.tied_by_hand:  # the output projection is the embedding, by a plain matmul
            return h @ wte.embedding.T
        return fnn.Dense(11)(h)


def _lm(tied_by_hand: bool):
    m = TinyLM(tied_by_hand)
    params = m.init(jax.random.PRNGKey(2), IDS)["params"]

    def loss_fn(p, ids):
        logits = m.apply({"params": p}, ids)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    return params, loss_fn


def _steps(opt, params, loss_fn, batch, n=3):
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p, batch)
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(p, u), s

    for _ in range(n):
        params, state = step(params, state)
        jax.block_until_ready(params)
    return params, state


def _first_step_warnings(opt, params, loss_fn, batch):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        _steps(opt, params, loss_fn, batch)
    return [str(w.message) for w in got if "first step's gradient" in str(w.message)]


@pytest.mark.parametrize("build", [grng_jax.ring, grng_jax.reng, grng_jax.rkalman])
def test_a_weight_tied_by_a_hand_written_matmul_is_named_at_the_first_step(build):
    """Before: `h @ wte.embedding.T` trained silently on factors of the lookup alone, and
    describe() said 100% of the weight-matrix elements were under K-FAC."""
    params, loss_fn = _lm(tied_by_hand=True)
    got = _first_step_warnings(build(), params, loss_fn, IDS)
    assert len(got) == 1 and "'wte/embedding'" in got[0] and "Dense_0" not in got[0], got


@pytest.mark.parametrize("chain", [None, "clip_by_global_norm", "weight_decay"])
def test_no_warning_where_the_rows_explain_the_gradient(chain):
    """The untied model, also behind a global clipping (c) or a decay added to the gradient
    (α·W) chained before the optimizer: nothing to warn about."""
    params, loss_fn = _lm(tied_by_hand=False)
    opt = grng_jax.ring()
    if chain == "clip_by_global_norm":
        opt = optax.chain(optax.clip_by_global_norm(1e-3), opt)
    elif chain == "weight_decay":
        opt = optax.chain(optax.add_decayed_weights(0.1), opt)
    assert _first_step_warnings(opt, params, loss_fn, IDS) == []


def test_a_loss_with_auxiliary_outputs_is_refused_with_the_fix():
    params, loss_fn = _lm(tied_by_hand=False)

    def with_aux(p, ids):
        return loss_fn(p, ids), {"tokens": ids.size}

    opt = grng_jax.ring()
    state = opt.init(params)
    g = jax.grad(loss_fn)(params, IDS)
    with pytest.raises(ValueError, match=r"one scalar; it returned a tuple.*f\(p, b\)\[0\]"):
        opt.update(g, state, params, loss_fn=with_aux, batch=IDS)


def test_a_setting_in_the_batch_is_named():
    params, loss_fn = _lm(tied_by_hand=False)
    opt = grng_jax.ring()
    state = opt.init(params)
    g = jax.grad(loss_fn)(params, IDS)
    with pytest.raises(ValueError, match="holds bool True.*close over them in loss_fn"):
        opt.update(g, state, params, loss_fn=lambda p, b: loss_fn(p, b["ids"]),
                   batch={"ids": IDS, "train": True})


@pytest.mark.parametrize("layer", ["ConvTranspose", "Einsum"])
def test_a_linen_layer_type_without_rows_is_named(layer):
    """Before: "not called through a tagged layer ... call it through a covered layer",
    for a layer the user did call through flax. `find_layers` leaves it to the diagonal."""
    class M(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            if layer == "ConvTranspose":
                h = fnn.ConvTranspose(4, (3,), strides=(2,))(x[..., None]).mean((1, 2))[:, None]
            else:
                h = fnn.Einsum((6, 4), "bi,io->bo")(x)
            return fnn.Dense(3)(jnp.tanh(h))

    m = M()
    params = m.init(jax.random.PRNGKey(0), X)["params"]
    y = jnp.arange(16) % 3

    def loss_fn(p, x):
        return optax.softmax_cross_entropy_with_integer_labels(m.apply({"params": p}, x),
                                                                y).mean()

    name = f"{layer}_0/kernel"
    with pytest.raises(ValueError, match=f"'{name}' is called as flax.linen {layer} "
                                         r"\(a layer type whose rows grng_jax does not read"):
        _steps(grng_jax.ring(), params, loss_fn, X, n=1)
    layers = grng_jax.find_layers(loss_fn, params, X)
    assert [tuple(L.weight) for L in layers] == [("Dense_0", "kernel")]
    _steps(grng_jax.ring(layers=layers), params, loss_fn, X, n=2)


def test_nnx_loss_fn_built_for_other_variables_names_wrt():
    """nnx.Optimizer over a `wrt` subset, with nnx_loss_fn's default (every nnx.Param):
    before, flax's "Incorrect number of leaves" from inside nnx.merge."""
    class M(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    def loss(model, x):
        return optax.softmax_cross_entropy_with_integer_labels(model(x),
                                                                jnp.arange(16) % 3).mean()

    model = M(nnx.Rngs(0))
    wrt = nnx.All(nnx.Param, nnx.PathContains("l2"))
    optimizer = nnx.Optimizer(model, grng_jax.ring(), wrt=wrt)

    def step(loss_fn):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model, X)
        optimizer.update(model, grads, loss_fn=loss_fn, batch=X)

    with pytest.raises(ValueError, match=r"nnx_loss_fn\(model, loss, wrt=wrt\)"):
        step(grng_jax.nnx_loss_fn(model, loss))
    step(grng_jax.nnx_loss_fn(model, loss, wrt=wrt))  # the fix works


def test_a_custom_linen_layer_calling_dense_on_its_kernel_stays_on_kfac():
    """A module of its own holding `kernel` and `bias` and calling grng_jax.dense on them (the
    README's way): its kernel is tagged inside its call, so it is no uncovered layer type."""
    class MyDense(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            k = self.param("kernel", fnn.initializers.lecun_normal(), (x.shape[-1], 8))
            b = self.param("bias", fnn.initializers.zeros, (8,))
            return grng_jax.dense(x, k, b)

    class M(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3)(jnp.tanh(MyDense()(x)))

    m = M()
    params = m.init(jax.random.PRNGKey(0), X)["params"]

    def loss_fn(p, x):
        return optax.softmax_cross_entropy_with_integer_labels(
            m.apply({"params": p}, x), jnp.arange(16) % 3).mean()

    assert sorted(tuple(L.weight) for L in grng_jax.find_layers(loss_fn, params, X)) == [
        ("Dense_0", "kernel"), ("MyDense_0", "kernel")]
    assert _first_step_warnings(grng_jax.ring(), params, loss_fn, X) == []


@pytest.mark.parametrize("how", ["multi_steps", "vmap"])
def test_the_gradient_check_stays_out_of_accumulation_and_vmap(how):
    """grng_jax.multi_steps hands a mean over micro-batches with the last one's rows (no
    product of them: not warned); under jax.vmap the first-step cond would run on every step
    (the check is skipped there)."""
    params, loss_fn = _lm(tied_by_hand=True)  # would warn in a plain run
    if how == "multi_steps":
        assert _first_step_warnings(grng_jax.multi_steps(grng_jax.ring(), 2), params, loss_fn,
                                    IDS) == []
        return
    opt = grng_jax.ring()

    def run(p):
        s = opt.init(p)
        g = jax.grad(loss_fn)(p, IDS)
        return opt.update(g, s, p, loss_fn=loss_fn, batch=IDS)[0]

    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), params)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.jit(jax.vmap(run))(stacked))
    assert not [w for w in got if "first step's gradient" in str(w.message)]
