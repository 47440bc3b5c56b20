"""Known optima of ill-conditioned problems (condition number 1e4): RENG, RING and R-Kalman,
with the structure and Fisher type the README recommends, reach the optimum in far fewer steps
than gradient descent with its best fixed step."""

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from grng_core.reference.data import ill_conditioned_least_squares, ill_conditioned_logistic
from tests import cases
from tests.helpers import mlp_layers

COND = 1e4
TOL = 1e-8  # relative loss gap (L − L*) / (L₀ − L*)


def grng_steps(opt, mlp, x, y, loss_opt, kind, fisher, max_steps=60):
    params = [np.zeros((mlp.sizes[-1], mlp.sizes[0]))]
    state = opt.init(params, layers=mlp_layers(mlp))
    gap0 = float(mlp.loss(params, x, y)) - loss_opt
    for t in range(1, max_steps + 1):
        targets = mlp.sample_targets(params, x, seed=t) if fisher == "mc" else None
        cur, inv = opt.flags(t - 1)
        upd, state = opt.update(mlp.grad(params, x, y), state, params,
                                stats=mlp.stats(params, x, y, kind=kind, stat_targets=targets),
                                oracle=mlp.oracle(x, y), curvature=cur, inverse=inv)
        params = gc.apply_updates(params, upd)
        if float(mlp.loss(params, x, y)) - loss_opt <= TOL * gap0:
            return t
    return None


def gd_steps(loss_grad, w0, lr, loss_opt, cap):
    w = w0.copy()
    gap0 = loss_grad(w)[0] - loss_opt
    for t in range(1, cap + 1):
        w = w - lr * loss_grad(w)[1]
        if loss_grad(w)[0] - loss_opt <= TOL * gap0:
            return t
    return cap + 1  # not reached


@pytest.fixture(scope="module")
def least_squares():
    return ill_conditioned_least_squares(256, 20, COND, seed=0)


@pytest.fixture(scope="module")
def logistic():
    p = ill_conditioned_logistic(512, 10, COND, seed=0)
    t = p.labels.astype(float)
    w = np.zeros(10)
    for _ in range(60):  # Newton's method on the binary logistic loss, the reference optimum
        z = p.x @ w
        s = 1 / (1 + np.exp(-z))
        H = (p.x.T * (s * (1 - s))) @ p.x / len(t)
        w -= np.linalg.solve(H, p.x.T @ (s - t) / len(t))
    loss_opt = float(np.mean(np.logaddexp(0, p.x @ w) - t * (p.x @ w)))
    return p, loss_opt


def test_gradient_descent_is_slow_on_least_squares(least_squares):
    """The baseline: GD with the best fixed step 2/(L + μ) needs ~κ/4·ln(1/TOL) steps."""
    x, y = least_squares.x, least_squares.y
    eig = np.linalg.eigvalsh(x.T @ x / len(x))
    assert eig[-1] / eig[0] == pytest.approx(COND, rel=1e-6)

    def loss_grad(w):
        r = x @ w - y[:, 0]
        return 0.5 * np.mean(r * r), x.T @ r / len(x)

    steps = gd_steps(loss_grad, np.zeros(20), 2 / (eig[0] + eig[-1]), least_squares.loss_opt,
                     cap=200_000)
    assert steps > 30_000


# K-FAC with the sampled ("mc") Fisher, each optimizer with its builder's estimator
LS_CASES = cases.select(structure="kfac", default_estimator=True, bare=True)


@pytest.mark.parametrize("case", LS_CASES, ids=lambda c: c.id)
def test_least_squares_optimum(least_squares, case):
    mlp = MLP((20, 1), loss="mse", bias=False)
    opt = case.build(lr=1.0, rho=0.05, damping=1e-10, fisher="mc")
    steps = grng_steps(opt, mlp, least_squares.x, least_squares.y,
                       least_squares.loss_opt, kind="layers", fisher="mc")
    assert steps is not None and steps <= 20  # vs > 30,000 for gradient descent


# the recommended structure per optimizer (woodbury for RENG/RING, K-FAC for R-Kalman), each
# with its statistics kind
LOGISTIC_CASES = [(cases.get(label, bare=True), kind) for label, kind in (
    ("reng/woodbury/double_bp", "per_example"), ("ring/woodbury/-", "per_example"),
    ("ring/woodbury/adaptive", "per_example"), ("rkalman/kfac/fin_diff", "layers"))]


def test_gradient_descent_is_slow_on_logistic(logistic):
    p, loss_opt = logistic
    t = p.labels.astype(float)

    def loss_grad(w):
        z = p.x @ w
        return (float(np.mean(np.logaddexp(0, z) - t * z)),
                p.x.T @ (1 / (1 + np.exp(-z)) - t) / len(t))

    best = min(gd_steps(loss_grad, np.zeros(10), lr, loss_opt, cap=5_000)
               for lr in (1.0, 2.0, 4.0, 8.0, 16.0))
    assert best > 1_000


@pytest.mark.parametrize("case,kind", LOGISTIC_CASES, ids=[c.id for c, _ in LOGISTIC_CASES])
def test_logistic_optimum(logistic, case, kind):
    p, loss_opt = logistic
    opt = case.build(lr=1.0, rho=0.05, damping=1e-8)
    mlp = MLP((10, 2), loss="softmax_ce", bias=False)
    steps = grng_steps(opt, mlp, p.x, p.y, loss_opt, kind=kind, fisher="empirical")
    assert steps is not None and steps <= 20  # vs > 1,000 for gradient descent
