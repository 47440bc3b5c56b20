"""Issue 6 at the adapter level (skipped when an adapter is not importable): a non-finite
step through grng_torch's optimizers or grng_jax's optax transformations (under jax.jit)
leaves the parameters and the core state unchanged and counts the skip."""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest

import grng_core as gc

HAS_TORCH_ADAPTER = importlib.util.find_spec("grng_torch") is not None
HAS_JAX_ADAPTER = importlib.util.find_spec("grng_jax") is not None

TORCH_CASES = [("RENG", "kfac"), ("RENG", "diagonal"), ("RING", "kfac"), ("RING", "woodbury"),
               ("RKalman", "woodbury"), ("RKalman", "kfac")]


def _flat_state(tree, prefix=""):
    import torch

    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_state(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat_state(v, f"{prefix}[{i}]"))
        return out
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.detach().clone()}
    return {}


@pytest.mark.skipif(not HAS_TORCH_ADAPTER, reason="grng_torch not importable")
@pytest.mark.parametrize("name,structure", TORCH_CASES, ids=[f"{n}-{s}" for n, s in TORCH_CASES])
def test_torch_adapter_skips_nonfinite_step(name, structure):
    import grng_torch
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    crit = nn.CrossEntropyLoss()
    opt = getattr(grng_torch, name)(model.parameters(), lr=0.1, model=model, loss_fn=crit,
                                    structure=structure)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def closure_for(inputs):
        def closure():
            opt.zero_grad()
            loss = crit(model(inputs), y)
            loss.backward()
            return loss
        return closure

    opt.step(closure_for(x))  # a good step first
    first = next(model.parameters())
    core_before = _flat_state(gc.codec.encode(opt.state[first]["grng"].core))
    params_before = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure_for(bad))
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), q)
    core_after = _flat_state(gc.codec.encode(opt.state[first]["grng"].core))
    assert set(core_after) == set(core_before)
    for k in core_before:
        if k == "/skipped":
            assert int(core_after[k]) == int(core_before[k]) + 1
        else:
            assert torch.equal(core_after[k], core_before[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step(closure_for(x))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not HAS_TORCH_ADAPTER, reason="grng_torch not importable")
def test_torch_adapter_raise_mode():
    import grng_torch
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(5, 3))
    crit = nn.CrossEntropyLoss()
    opt = grng_torch.RING(model.parameters(), lr=0.1, model=model, loss_fn=crit,
                          on_nonfinite="raise")
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    x[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


@pytest.mark.skipif(not HAS_TORCH_ADAPTER, reason="grng_torch not importable")
def test_torch_adapter_rejects_invalid_hyperparameter():
    import grng_torch
    from torch import nn

    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"damping=-1\.0.*\(0\.0, inf\)"):
        grng_torch.RING(model.parameters(), lr=0.1, damping=-1.0, model=model)


@pytest.mark.skipif(not HAS_JAX_ADAPTER, reason="grng_jax not importable")
@pytest.mark.parametrize("name", ["reng", "ring", "rkalman"])
def test_jax_adapter_skips_nonfinite_under_jit(name):
    import grng_jax
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(params, batch):
        x, y = batch
        h = jnp.tanh(grng_jax.dense(x, params[0]["kernel"], params[0]["bias"]))
        logits = grng_jax.dense(h, params[1]["kernel"], params[1]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    k1, k2 = jax.random.split(jax.random.key(0))
    params = [grng_jax.init_dense(k1, 4, 6), grng_jax.init_dense(k2, 6, 3)]
    opt = getattr(grng_jax, name)(0.1, ns_max_iter=8)
    state = opt.init(params)
    x = jax.random.normal(jax.random.key(1), (8, 4), dtype=params[0]["kernel"].dtype)
    y = jnp.arange(8) % 3

    @jax.jit
    def step(p, s, x):
        g = jax.grad(loss_fn)(p, (x, y))
        u, s = opt.update(g, s, p, loss_fn=loss_fn, batch=(x, y))
        return optax.apply_updates(p, u), s

    params, state = step(params, state, x)
    before_p = jax.tree.map(np.asarray, params)
    before_s = jax.tree.map(np.asarray, gc.codec.encode(state.core))
    p2, s2 = step(params, state, x.at[0, 0].set(jnp.nan))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, p2), before_p)
    assert int(s2.core.skipped) == int(before_s["skipped"]) + 1
    rest = {k: v for k, v in gc.codec.encode(s2.core).items() if k != "skipped"}
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rest),
                 {k: v for k, v in before_s.items() if k != "skipped"})
    assert step._cache_size() == 1
