"""Every optimizer × structure × estimator, 20 steps on the reference MLP: all backends agree
to relative 1e-10 in float64 (ALGORITHMS.md §4, the cross-backend contract); state lives on the
parameters' device and in the state dtype."""

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from grng_core.state import arrays
from tests import cases
from tests.backends import BACKEND_NAMES, get_backend
from tests.helpers import mlp_layers, train, tree_rel_err

# every row of the table (tests/cases.py), with the builders' defaults and this suite's data
CONFIGS = cases.select(bare=True)
HP = {"rkalman": dict(lr=0.5)}
STEPS = 20


def make(config, **kw):
    return config.build(**{**HP.get(config.optimizer, {}), **kw})


@pytest.fixture(scope="module")
def data():
    rs = np.random.default_rng(0)
    mlp = MLP((5, 7, 3), activation="tanh", loss="softmax_ce")
    x = rs.normal(size=(16, 5))
    y = np.eye(3)[rs.integers(0, 3, 16)]
    return mlp, x, y


@pytest.fixture(scope="module")
def numpy_runs(data):
    mlp, x, y = data
    return {c: train(get_backend("numpy"), mlp, make(c), x, y, STEPS) for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=cases.idfn)
@pytest.mark.parametrize("name", [b for b in BACKEND_NAMES if b != "numpy"])
def test_backends_agree(data, numpy_runs, config, name):
    mlp, x, y = data
    ref_params, _, ref_losses = numpy_runs[config]
    assert ref_losses[-1] < ref_losses[0]
    params, _, _ = train(get_backend(name), mlp, make(config), x, y, STEPS)
    assert tree_rel_err(params, ref_params) < 1e-10


JIT_CONFIGS = cases.select(default_estimator=True, bare=True)  # each structure once


@pytest.mark.parametrize("config", JIT_CONFIGS, ids=cases.idfn)
def test_jitted_in_graph_flags_agree(data, numpy_runs, config):
    """The whole core step under jax.jit, refresh decided in-graph (curvature=None)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    mlp, x, y = data
    opt = make(config, curvature_every=2, inverse_every=3, ns_max_iter=15)  # compile time
    ref_params, _, _ = train(get_backend("numpy"), mlp, opt, x, y, 6)
    params = [jnp.asarray(p) for p in mlp.init(seed=0)]
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    state = opt.init(params, layers=mlp_layers(mlp))

    @jax.jit
    def step(params, state):
        upd, state = opt.update(mlp.grad(params, xj, yj), state, params,
                                stats=mlp.stats(params, xj, yj, kind="both"),
                                oracle=mlp.oracle(xj, yj))
        return gc.apply_updates(params, upd), state

    params, state = step(params, state)
    params, state = step(params, state)  # outputs of a jitted call may be placed differently
    compiled = step._cache_size()
    for _ in range(4):
        params, state = step(params, state)
    assert step._cache_size() == compiled  # no recompilation after the first steps
    assert tree_rel_err([np.asarray(p) for p in params], ref_params) < 1e-10


@pytest.mark.parametrize("config", CONFIGS, ids=cases.idfn)
def test_state_on_device_and_in_state_dtype(data, config):
    """array_api_strict's non-default device and float32 params catch placement mistakes."""
    xps = pytest.importorskip("array_api_strict")
    mlp, x, y = data
    b = get_backend("array_api_strict_device1")
    params, state, losses = train(b, mlp, make(config), x, y, 3, dtype="float32")
    assert np.isfinite(losses).all()
    leaves = arrays(state)
    for leaf in leaves:
        assert leaf.device == b.device
        assert leaf.dtype in (xps.float32, xps.int32)
    assert all(p.dtype == np.float32 for p in params)
