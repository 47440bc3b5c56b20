"""Checkpoints of the JAX state: any pytree checkpointer (orbax), and grng_jax.save / load
(grng_core's portable .npz with the hyperparameters checked), for a bare GRNGState and for the
state of an optax chain; plus the factories' generated signatures."""

from __future__ import annotations

import inspect

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grng_core as gc
from grng_core.config import CONFIGS
from tests import cases
from tests.jax import _problems as P

SIZES = (5, 6, 3)
B = 12
CH = dict(inverse_method="cholesky")


def _batch(dtype=jnp.float64, seed=1):
    x = jax.random.normal(jax.random.PRNGKey(seed), (B, SIZES[0]), dtype)
    return x, jnp.arange(B) % SIZES[-1]


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _run(opt, params, batch, steps, **extra):
    step = jax.jit(P.make_step(opt, P.softmax_ce, **extra))
    p, s = params, opt.init(params)
    for _ in range(steps):
        p, s, _ = step(p, s, batch)
    return step, p, s


def test_state_checkpoint_roundtrip_resumes_identically(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, batch = P.mlp_params(SIZES), _batch()
    opt = grng_jax.ring(0.1, momentum=0.5, curvature_every=1, inverse_every=2, refresh_warmup=0,
                        **CH)
    step, p, s = _run(opt, params, batch, 3)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", s)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", s)
    assert isinstance(restored, grng_jax.GRNGState)
    pa, sa = p, s
    pb, sb = p, restored
    for _ in range(3):
        pa, sa, _ = step(pa, sa, batch)
        pb, sb, _ = step(pb, sb, batch)
    assert _max_diff(pa, pb) == 0.0
    assert _max_diff(sa, sb) == 0.0
    avals = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
    assert avals(restored) == avals(s)


def test_portable_checkpoint_through_grng_core(tmp_path):
    params, batch = P.mlp_params(SIZES), _batch()
    opt = grng_jax.ring(0.1, fisher="mc", seed=5, **CH)
    mc = grng_jax.mc_softmax_cross_entropy(lambda p, b: P.mlp_logits(p, b[0]))
    step, p, s = _run(opt, params, batch, 2, mc_loss_fn=mc)
    grng_jax.save(tmp_path / "state.npz", opt, s)
    meta = gc.read_metadata(tmp_path / "state.npz")
    assert meta["extra"]["adapter"] == "grng_jax" and meta["extra"]["layout"] == "core"
    assert meta["optimizer"] == "ring" and meta["hyperparams"]["fisher"] == "mc"
    restored = grng_jax.load(tmp_path / "state.npz", opt, like=opt.init(params))
    assert _max_diff(restored, s) == 0.0
    numpy_state = gc.load_state(tmp_path / "state.npz")  # readable without JAX
    assert int(numpy_state["step"]) == 2
    # and by the core itself, with its hyperparameter check
    core = opt.init.grng_core
    like = gc.load_state(tmp_path / "state.npz", like=s.core, opt=core)
    assert _max_diff(like, s.core) == 0.0
    pa, _, _ = step(p, s, batch)
    pb, _, _ = step(p, restored, batch)
    assert _max_diff(pa, pb) == 0.0


def test_load_checks_the_hyperparameters(tmp_path):
    params, batch = P.mlp_params(SIZES), _batch()
    opt = grng_jax.ring(0.1, damping=1e-2, structure="diagonal")
    _, _, s = _run(opt, params, batch, 1)
    grng_jax.save(tmp_path / "s.npz", opt, s)
    other = grng_jax.ring(0.1, damping=2e-2, structure="diagonal")
    with pytest.raises(ValueError, match="hyperparameters differ.*damping"):
        grng_jax.load(tmp_path / "s.npz", other, like=other.init(params))
    # another learning rate or schedule: refused in optax's spelling, accepted when allowed
    for lr in (0.05, optax.linear_schedule(0.1, 0.01, 100)):
        slower = grng_jax.ring(lr, damping=1e-2, structure="diagonal")
        with pytest.raises(ValueError, match=r"\(learning_rate: file 0.1, optimizer .*"
                                             r"allow_changed=\('learning_rate',\)"):
            grng_jax.load(tmp_path / "s.npz", slower, like=slower.init(params))
        back = grng_jax.load(tmp_path / "s.npz", slower, like=slower.init(params),
                             allow_changed=("learning_rate",))
        assert _max_diff(back, s) == 0.0
    with pytest.raises(ValueError, match="damping"):  # the others are still checked
        grng_jax.load(tmp_path / "s.npz", other, like=other.init(params),
                      allow_changed=("learning_rate",))
    reng = grng_jax.reng(0.1, damping=1e-2, structure="diagonal", rho=0.0)
    with pytest.raises(ValueError, match="checkpoint is for optimizer 'ring'"):
        grng_jax.load(tmp_path / "s.npz", reng, like=reng.init(params))
    with pytest.raises(TypeError, match="exactly one GRNGState"):
        grng_jax.save(tmp_path / "t.npz", opt, {"a": jnp.zeros(2)})
    with pytest.raises(TypeError, match="grng_jax transformation"):
        grng_jax.save(tmp_path / "t.npz", optax.sgd(0.1), s)



def test_a_schedule_is_checked_by_its_values(tmp_path):
    """optax schedules are recorded by their values: another schedule is refused (before,
    cosine_decay_schedule(0.1, 60) loaded into cosine_decay_schedule(0.5, 60) silently), the
    same schedule built again loads."""
    params, batch = P.mlp_params(SIZES), _batch()
    opt = grng_jax.ring(optax.cosine_decay_schedule(0.1, 60), structure="diagonal")
    _, _, s = _run(opt, params, batch, 2)
    grng_jax.save(tmp_path / "s.npz", opt, s)
    same = grng_jax.ring(optax.cosine_decay_schedule(0.1, 60), structure="diagonal")
    assert _max_diff(grng_jax.load(tmp_path / "s.npz", same, like=same.init(params)), s) == 0
    other = grng_jax.ring(optax.cosine_decay_schedule(0.5, 60), structure="diagonal")
    with pytest.raises(ValueError, match=r"learning_rate: file 'schedule\(1: 0.1, 2: 0.0999.*"
                                         r"optimizer 'schedule\(1: 0.5, 2: 0.499"):
        grng_jax.load(tmp_path / "s.npz", other, like=other.init(params))

def test_fallback_structure_is_what_the_checkpoint_records(tmp_path):
    """A kfac optimizer on a model without layers runs (and records) its fallback."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    opt = grng_jax.ring(0.1, fallback="woodbury")
    state = opt.init(params)
    grng_jax.save(tmp_path / "s.npz", opt, state)
    assert gc.read_metadata(tmp_path / "s.npz")["hyperparams"]["structure"] == "woodbury"
    back = grng_jax.load(tmp_path / "s.npz", opt, like=state)
    assert _max_diff(back, state) == 0.0


def test_chain_state_round_trip(tmp_path):
    """An optax chain: the GRNGState is found in the chain's tuple and the chain's other
    arrays (here the EMA of optax.ema) are saved beside it."""
    params, batch = P.mlp_params(SIZES), _batch()
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.ema(0.5),
                        grng_jax.ring(0.1, momentum=0.5, **CH))
    step, p, s = _run(chain, params, batch, 2)
    path = tmp_path / "chain.npz"
    grng_jax.save(path, chain, s)
    assert gc.read_metadata(path)["extra"]["layout"] == "optax"
    like = chain.init(params)
    back = grng_jax.load(path, chain, like=like)
    assert jax.tree.structure(back) == jax.tree.structure(s)
    assert _max_diff(back, s) == 0.0
    assert _max_diff(like, chain.init(params)) == 0.0  # the template is not modified
    assert int(gc.load_state(path)["grng"]["step"]) == 2  # the core state, for any backend
    pa, _, _ = step(p, s, batch)
    pb, _, _ = step(p, back, batch)
    assert _max_diff(pa, pb) == 0.0
    # a chain without other arrays keeps the core layout
    plain = optax.chain(optax.clip_by_global_norm(1.0), grng_jax.ring(0.1, **CH))
    _, _, s2 = _run(plain, params, batch, 1)
    grng_jax.save(tmp_path / "plain.npz", plain, s2)
    assert gc.read_metadata(tmp_path / "plain.npz")["extra"]["layout"] == "core"
    back2 = grng_jax.load(tmp_path / "plain.npz", plain, like=plain.init(params))
    assert _max_diff(back2, s2) == 0.0


def test_multisteps_state_round_trip(tmp_path):
    """optax.MultiSteps (an object, not a closure): save / load / describe find the grng_jax
    transformation inside it, also through its gradient_transformation(); the accumulated
    gradient is saved beside the state and the run resumes identically."""
    params, batch = P.mlp_params(SIZES), _batch()
    multi = optax.MultiSteps(grng_jax.ring(0.1, **CH), every_k_schedule=2)
    step, p, s = _run(multi, params, batch, 3)  # mid-accumulation: a gradient is held
    for opt in (multi, multi.gradient_transformation()):
        path = tmp_path / "multi.npz"
        grng_jax.save(path, opt, s)
        back = grng_jax.load(path, opt, like=multi.init(params))
        assert jax.tree.structure(back) == jax.tree.structure(s)
        assert _max_diff(back, s) == 0.0
        assert grng_jax.describe(opt, back, params).kfac_share == 1.0
    assert _max_diff(step(p, s, batch)[0], step(p, back, batch)[0]) == 0.0


def test_the_old_checkpoint_names_point_to_the_new_ones():
    with pytest.raises(AttributeError, match=r"grng_jax.save\(path, opt, state\)"):
        grng_jax.save_state  # noqa: B018


@pytest.mark.parametrize("name", cases.OPTIMIZERS)
def test_factories_take_every_config_field(name):
    sig = inspect.signature(getattr(grng_jax, name))
    fields = [("learning_rate" if f == "lr" else f) for f in CONFIGS[name].names()]
    names = list(sig.parameters)
    assert sorted(names[:len(fields)]) == sorted(fields)
    assert names[len(fields):] == ["axis_name", "layers", "refresh", "fallback", "seed"]
    assert all(sig.parameters[f].default is None for f in fields)
    positional = [n for n, p in sig.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == (["learning_rate", "rho"] if name == "rkalman" else
                          ["learning_rate", "rho", "damping"])
    doc = getattr(grng_jax, name).__doc__
    assert all(f in doc for f in fields) and "fallback" in doc
    opt = getattr(grng_jax, name)(0.3)
    core = opt.init.grng_core
    assert core.name == name and core.config.lr == 0.3
    assert core.config == CONFIGS[name](lr=0.3)  # None everywhere else: the core's defaults
    assert np.isfinite(core.config.rho)


def test_an_nnx_optimizer_resumes_from_grng_jax_load(tmp_path):
    """nnx.Optimizer keeps its opt_state in nnx wrappers: the README's restore (the loaded
    arrays wrapped back, the step counter restored) continues bit-identically."""
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(6, 12, rngs=rngs), nnx.Linear(12, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.tanh(self.l1(x)))

    def batch(i):
        x = jax.random.normal(jax.random.key(100 + i), (24, 6), jnp.float32)
        return x, (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0)

    def loss(model, b):
        return optax.softmax_cross_entropy_with_integer_labels(model(b[0]), b[1]).mean()

    @nnx.jit
    def train_step(model, optimizer, b):
        loss_fn = grng_jax.nnx_loss_fn(model, loss)
        g = nnx.grad(loss)(model, b)
        optimizer.update(model, g, loss_fn=loss_fn, batch=b)

    opt = grng_jax.ring()
    whole = MLP(nnx.Rngs(0))
    o_whole = nnx.Optimizer(whole, opt, wrt=nnx.Param)
    first = MLP(nnx.Rngs(0))
    o_first = nnx.Optimizer(first, opt, wrt=nnx.Param)
    for i in range(6):
        train_step(whole, o_whole, batch(i))
        if i < 3:
            train_step(first, o_first, batch(i))
    path = str(tmp_path / "nnx.npz")
    grng_jax.save(path, opt, o_first.opt_state)
    resumed = MLP(nnx.Rngs(0))
    nnx.update(resumed, nnx.state(first, nnx.Param))
    o_resumed = nnx.Optimizer(resumed, opt, wrt=nnx.Param)
    o_resumed.opt_state = nnx.data(nnx.training.optimizer.to_opt_state(
        grng_jax.load(path, opt, o_resumed.opt_state)))
    o_resumed.step[...] = o_first.step[...]
    for i in range(3, 6):
        train_step(resumed, o_resumed, batch(i))
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(whole, nnx.Param)),
                    jax.tree_util.tree_leaves(nnx.state(resumed, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
