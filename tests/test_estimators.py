"""Finite-difference GR estimators tend to g + ρHg as the radius shrinks (ALGORITHMS.md §1)."""

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from tests.helpers import rel_err


@pytest.fixture
def problem():
    rs = np.random.default_rng(3)
    mlp = MLP((4, 6, 3), activation="tanh", loss="softmax_ce")
    x = rs.normal(size=(8, 4))
    y = np.eye(3)[rs.integers(0, 3, 8)]
    return mlp, mlp.init(seed=1), x, y


def ghat(opt_kwargs, mlp, params, x, y, backend):
    """ĝ read off one step of RENG with the diagonal structure at huge damping (d ≈ ĝ/λ)."""
    lam = 1e8
    opt = gc.reng(lr=1.0, damping=lam, structure="diagonal", **opt_kwargs)
    p = backend.tree(params)
    xb, yb = backend.asarray(x), backend.asarray(y)
    upd, _ = opt.update(mlp.grad(p, xb, yb), opt.init(p), p, oracle=mlp.oracle(xb, yb))
    b = mlp.batch(params, x, y, per_example=False)
    q = [g * g for g in b.grads]
    return np.concatenate([np.ravel(-u * (qi + lam)) for u, qi in
                           zip(backend.tree_numpy(upd), q)])


def exact(mlp, params, x, y, rho):
    g = mlp.grad(params, x, y)
    hg = mlp.hvp(params, x, y, g)
    return np.concatenate([np.ravel(a + rho * b) for a, b in zip(g, hg)])


@pytest.mark.parametrize("scheme,order", [("forward", 1), ("backward", 1), ("central", 2)])
def test_finite_difference_converges_to_exact(backend, problem, scheme, order):
    mlp, params, x, y = problem
    rho = 0.1
    ref = exact(mlp, params, x, y, rho)
    errs = [rel_err(ghat(dict(rho=rho, gr="finite_difference", fd_scheme=scheme, fd_radius=r),
                         mlp, params, x, y, backend), ref) for r in (1e-2, 1e-3)]
    assert errs[1] < errs[0] / (10 ** order) * 3  # O(r) or O(r²)
    assert errs[1] < (1e-3 if order == 1 else 1e-5)


def test_double_backprop_is_exact(backend, problem):
    mlp, params, x, y = problem
    got = ghat(dict(rho=0.2, gr="double_backprop"), mlp, params, x, y, backend)
    assert rel_err(got, exact(mlp, params, x, y, 0.2)) < 1e-10


def test_zero_gradient_gives_g_without_nan(numpy_backend, problem):
    mlp, params, x, y = problem
    opt = gc.reng(lr=1.0, rho=0.1, damping=1.0, structure="diagonal", gr="finite_difference")
    zeros = [np.zeros_like(p) for p in params]
    upd, state = opt.update(zeros, opt.init(params), params, oracle=mlp.oracle(x, y))
    assert all(np.array_equal(u, np.zeros_like(u)) for u in upd)
    assert int(state.skipped) == 0


def test_forward_scheme_with_rho_equal_eps_is_sam_gradient(numpy_backend, problem):
    """ρ = ε gives ∇L(θ + ρ g) (the unnormalised SAM gradient, §1)."""
    mlp, params, x, y = problem
    g = mlp.grad(params, x, y)
    norm = np.sqrt(sum(np.sum(v * v) for v in g))
    r = 1e-2
    rho = r / norm
    got = ghat(dict(rho=rho, gr="finite_difference", fd_radius=r), mlp, params, x, y,
               numpy_backend)
    sam = mlp.grad([p + rho * v for p, v in zip(params, g)], x, y)
    assert rel_err(got, np.concatenate([np.ravel(v) for v in sam])) < 1e-6
