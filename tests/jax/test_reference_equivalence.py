"""In float64 the JAX adapter, jitted, takes the core's step on the reference MLP
(grng_core.reference: hand-written gradients, statistics and HVPs) with the same weights and
batches, to a relative 1e-10; and the torch adapter's step, when grng_torch imports.

The JAX side runs only grng_jax machinery: tagged dense layers and the perturbation pass (K-FAC
rows), vmap-of-grad per-example gradients, jvp-of-grad HVPs, re-evaluated gradients for finite
differences. Its kernels are stored (d_in, d_out) (Flax layout, LayerSpec transposed=True); the
reference's weights are (d_out, d_in). For fisher="mc" both sides use the same sampled targets.
"""

from __future__ import annotations

import importlib.util

import grng_jax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grng_core as gc
from grng_core.reference import MLP
from tests.jax import _problems as P

SIZES = (5, 7, 6, 3)
B = 9
STEPS = 3
RTOL = 1e-10

CASES = [
    # (algorithm, structure, fisher, (gr, fd_scheme) or None, loss)
    ("reng", "kfac", "empirical", ("double_backprop", "forward"), "softmax_ce"),
    ("reng", "kfac", "empirical", ("finite_difference", "forward"), "softmax_ce"),
    ("reng", "kfac", "empirical", ("finite_difference", "central"), "softmax_ce"),
    ("reng", "kfac", "mc", ("double_backprop", "forward"), "softmax_ce"),
    ("reng", "diagonal", "empirical", ("double_backprop", "forward"), "softmax_ce"),
    ("reng", "diagonal", "empirical", ("finite_difference", "backward"), "softmax_ce"),
    ("reng", "diagonal", "mc", ("double_backprop", "forward"), "softmax_ce"),
    ("reng", "woodbury", "empirical", ("double_backprop", "forward"), "softmax_ce"),
    ("reng", "woodbury", "mc", ("finite_difference", "forward"), "softmax_ce"),
    ("reng", "kfac", "empirical", ("double_backprop", "forward"), "mse"),
    ("ring", "kfac", "empirical", None, "softmax_ce"),
    ("ring", "kfac", "mc", None, "softmax_ce"),
    ("ring", "diagonal", "empirical", None, "softmax_ce"),
    ("ring", "woodbury", "empirical", None, "softmax_ce"),
    ("ring", "woodbury", "empirical", None, "mse"),
    ("rkalman", "woodbury", "empirical", ("finite_difference", "forward"), "softmax_ce"),
    ("rkalman", "woodbury", "empirical", ("double_backprop", "forward"), "softmax_ce"),
    ("rkalman", "diagonal", "empirical", ("finite_difference", "forward"), "softmax_ce"),
    ("rkalman", "kfac", "empirical", ("finite_difference", "forward"), "softmax_ce"),
    ("rkalman", "kfac", "mc", ("double_backprop", "forward"), "softmax_ce"),
    ("rkalman", "diagonal", "empirical", ("double_backprop", "forward"), "mse"),
]


def _case_id(case):
    algo, structure, fisher, gr, loss = case
    tail = "" if gr is None else f"-{gr[0]}-{gr[1]}"
    return f"{algo}-{structure}-{fisher}{tail}-{loss}"


# Newton–Schulz (the default inverse) is kept on these; the other cases invert with Cholesky,
# which gives the same inverse to the tolerance and compiles several times faster (the core
# unrolls its fixed Newton–Schulz budget into the traced graph).
NEWTON_SCHULZ = {("reng", "kfac", "empirical", ("double_backprop", "forward"), "softmax_ce"),
                 ("ring", "kfac", "empirical", None, "softmax_ce")}


def _hyper(algo, structure, fisher, gr, loss="softmax_ce"):
    """The torch adapter's equivalence hyperparameters (tests/torch), so the two can agree."""
    hp = dict(structure=structure, fisher=fisher, momentum=0.5, weight_decay=0.01)
    if (algo, structure, fisher, gr, loss) not in NEWTON_SCHULZ:
        hp["inverse_method"] = "cholesky"
    if algo == "rkalman":
        hp.update(lr=0.3, rho=0.05, damping=1e-2, prior_var=0.5)
    else:
        hp.update(lr=0.2, rho=0.05, damping=1e-2)
    if structure == "diagonal":  # g/(v + λ) with a tiny λ makes steps that amplify round-off
        hp.update(damping=0.3)
    if gr is not None:
        hp.update(gr=gr[0], fd_scheme=gr[1], fd_radius=1e-3)
    return hp


def _data(loss, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((B, SIZES[0])) for _ in range(STEPS)]
    if loss == "softmax_ce":
        ys = [np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)] for _ in range(STEPS)]
        mc = [np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)] for _ in range(STEPS)]
    else:
        ys = [rng.standard_normal((B, SIZES[-1])) for _ in range(STEPS)]
        mc = [rng.standard_normal((B, SIZES[-1])) for _ in range(STEPS)]
    return xs, ys, mc


def _reference_run(opt, mlp, params, xs, ys, mc):
    """The core on the reference MLP (NumPy): per step, the updates it returns."""
    r = opt.requirements
    layers = [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]
    state = opt.init(params, layers=layers if opt.config.structure == "kfac" else None)
    out = []
    for step, (x, y, y_mc) in enumerate(zip(xs, ys, mc)):
        curvature, inverse = opt.flags(step)  # step: the steps already taken
        stat_targets = y_mc if r.fisher == "mc" else None
        stats = None
        if curvature and (r.layer_stats or r.per_example_grads):
            kind = "layers" if r.layer_stats else "per_example"
            stats = mlp.stats(params, x, y, kind=kind, stat_targets=stat_targets)
        updates, state = opt.update(mlp.grad(params, x, y), state, params, stats=stats,
                                    oracle=mlp.oracle(x, y), curvature=curvature,
                                    inverse=inverse)
        params = gc.apply_updates(params, updates)
        out.append([np.asarray(u) for u in updates])
    return out


def _to_jax(params):
    """Reference [W0, b0, W1, b1, ...] (W: (d_out, d_in)) -> [{"kernel": W0ᵀ, "bias": b0}, ...]."""
    return [{"kernel": jnp.asarray(params[2 * k].T), "bias": jnp.asarray(params[2 * k + 1])}
            for k in range(len(params) // 2)]


def _from_jax(tree):
    out = []
    for layer in tree:
        out += [np.asarray(layer["kernel"]).T, np.asarray(layer["bias"])]
    return out


_JAX_RUNS: dict = {}


def _jax_run_cached(case, hp, params, xs, ys, mc):
    """The JAX side of `case` (the torch comparison reuses the reference comparison's run)."""
    if case not in _JAX_RUNS:
        _JAX_RUNS[case] = _jax_run(case[0], hp, params, xs, ys, mc, case[4])
    return _JAX_RUNS[case]


def _jax_run(algo, hp, params, xs, ys, mc, loss):
    hp = dict(hp)
    lr = hp.pop("lr")
    opt = getattr(grng_jax, algo)(lr, **hp)
    loss_fn = P.softmax_ce if loss == "softmax_ce" else P.half_mse

    def mc_loss_fn(p, batch, key):  # the sampled targets are the batch's third entry
        return loss_fn(p, (batch[0], batch[2]))

    @jax.jit
    def step(p, state, batch):
        grads = jax.grad(loss_fn)(p, batch)
        updates, state = opt.update(grads, state, p, loss_fn=loss_fn, batch=batch,
                                    mc_loss_fn=mc_loss_fn)
        return optax.apply_updates(p, updates), state, updates

    p = _to_jax(params)
    state = opt.init(p)
    out = []
    for x, y, y_mc in zip(xs, ys, mc):
        p, state, updates = step(p, state, (jnp.asarray(x), jnp.asarray(y), jnp.asarray(y_mc)))
        out.append(_from_jax(updates))
    assert step._cache_size() == 1
    return out


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _assert_close(got, want, what):
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for k, (g, w) in enumerate(zip(g_step, w_step, strict=True)):
            assert g.shape == w.shape
            err = _rel(g, w)
            assert err <= RTOL, f"{what}: step {t}, leaf {k}: relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_jax_step_equals_core_on_reference_mlp(case):
    algo, structure, fisher, gr, loss = case
    hp = _hyper(algo, structure, fisher, gr, loss)
    mlp = MLP(SIZES, activation="tanh", loss=loss)
    params = mlp.init(seed=3)
    xs, ys, mc = _data(loss, seed=7)
    factory = {"reng": gc.reng, "ring": gc.ring, "rkalman": gc.rkalman}[algo]
    want = _reference_run(factory(**hp), mlp, params, xs, ys, mc)
    got = _jax_run_cached(case, hp, params, xs, ys, mc)
    _assert_close(got, want, "jax vs reference")


def test_adapter_collects_reference_statistics():
    """The perturbation pass's K-FAC rows and the vmap per-example gradients are the reference's."""
    from grng_jax import _collect

    mlp = MLP(SIZES, activation="tanh", loss="softmax_ce")
    params = mlp.init(seed=1)
    xs, ys, _ = _data("softmax_ce", seed=2)
    tree = _to_jax(params)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    batch = (jnp.asarray(xs[0]), jnp.asarray(ys[0]))
    # leaves in flatten order: [b0, k0, b1, k1, ...]: (weight, bias) = (2k+1, 2k)
    specs = [(2 * k + 1, 2 * k) for k in range(mlp.n_layers)]
    layers = jax.jit(lambda lv, b: _collect.layer_stats(P.softmax_ce, treedef, lv, b, specs))(
        leaves, batch)
    pe = jax.jit(lambda lv, b: _collect.per_example_grads(P.softmax_ce, treedef, lv, b))(
        leaves, batch)
    ref = mlp.stats(params, xs[0], ys[0], kind="both")
    for got, want in zip(layers, ref.layers, strict=True):
        assert got.transposed and not want.transposed
        assert _rel(np.asarray(got.inputs), want.inputs) < 1e-13
        assert _rel(np.asarray(got.output_grads), want.output_grads) < 1e-13
    for k in range(mlp.n_layers):
        assert _rel(np.asarray(pe[2 * k + 1]).transpose(0, 2, 1), ref.per_example_grads[2 * k]) \
            < 1e-13
        assert _rel(np.asarray(pe[2 * k]), ref.per_example_grads[2 * k + 1]) < 1e-13


# ------------------------------------------------------------------ the torch adapter
TORCH_CASES = [
    ("reng", "kfac", "empirical", ("double_backprop", "forward"), "softmax_ce"),
    ("ring", "woodbury", "empirical", None, "softmax_ce"),
    ("rkalman", "kfac", "empirical", ("finite_difference", "forward"), "softmax_ce"),
    ("rkalman", "diagonal", "empirical", ("double_backprop", "forward"), "mse"),
]


def _torch_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        import grng_torch  # noqa: F401
    except Exception:  # not written yet, or broken: the test says so by skipping
        return False
    return True


def _torch_run(algo, hp, params, xs, ys, loss):
    import grng_torch as gt
    import torch
    from torch import nn

    layers = []
    for k, (d_in, d_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if k < len(SIZES) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(v))
    if loss == "softmax_ce":
        loss_fn = nn.CrossEntropyLoss()  # probability targets: -Σ y log softmax(z)
    else:
        loss_fn = gt.LossModule(lambda z, y: 0.5 * ((z - y) ** 2).sum(-1).mean())
    cls = {"reng": gt.RENG, "ring": gt.RING, "rkalman": gt.RKalman}[algo]
    opt = cls(model.parameters(), model=model, loss_fn=loss_fn, **hp)
    out = []
    for x, y in zip(xs, ys):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        before = [p.detach().clone() for p in model.parameters()]

        def closure(xt=xt, yt=yt):
            opt.zero_grad()
            value = loss_fn(model(xt), yt)
            value.backward()
            return value

        opt.step(closure)
        out.append([(p.detach() - b).numpy() for p, b in zip(model.parameters(), before)])
    return out


@pytest.mark.parametrize("case", TORCH_CASES, ids=[_case_id(c) for c in TORCH_CASES])
def test_jax_step_equals_torch_adapter_step(case):
    if not _torch_available():
        pytest.skip("torch or grng_torch does not import")
    algo, structure, fisher, gr, loss = case
    hp = _hyper(algo, structure, fisher, gr, loss)
    mlp = MLP(SIZES, activation="tanh", loss=loss)
    params = mlp.init(seed=3)
    xs, ys, mc = _data(loss, seed=7)
    want = _torch_run(algo, hp, params, xs, ys, loss)
    got = _jax_run_cached(case, hp, params, xs, ys, mc)
    _assert_close(got, want, "jax vs torch")
