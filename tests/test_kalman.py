"""R-Kalman beliefs against the dense Kalman filter of ALGORITHMS.md §3.3."""

import numpy as np
import pytest

import grng_core as gc
from grng_core.reference import MLP
from tests.helpers import mlp_layers, rel_err

NO_CLIP = dict(kl_clip=None)  # single steps against references without the §3 trust region


def flat(leaves):
    return np.concatenate([np.ravel(v) for v in leaves])


def unflat(v, like):
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.size].reshape(p.shape))
        i += p.size
    return out


@pytest.fixture
def problem():
    rs = np.random.default_rng(2)
    mlp = MLP((3, 4, 2), activation="tanh", loss="softmax_ce")
    x = rs.normal(size=(5, 3))
    y = np.eye(2)[rs.integers(0, 2, 5)]
    return mlp, mlp.init(seed=4), x, y


def test_woodbury_belief_equals_dense_kalman(backend, problem):
    mlp, params, x, y = problem
    beta, prior, lr = 0.9, 0.5, 1.0
    opt = gc.rkalman(**NO_CLIP, lr=lr, rho=0.0, structure="woodbury", kalman_decay=beta,
                     prior_var=prior)
    p = backend.tree(params)
    xb, yb = backend.asarray(x), backend.asarray(y)
    state = opt.init(p)
    theta = flat(params)
    pvar = np.full(theta.size, prior)
    B = x.shape[0]
    for _ in range(3):
        # dense reference: P⁻ = diag(p⁻), S = R + J P⁻ Jᵀ, K = P⁻ Jᵀ S⁻¹, P⁺ = P⁻ − K J P⁻
        cur = unflat(theta, params)
        b = mlp.batch(cur, x, y, per_example=True)
        J = np.concatenate([j.reshape(B, -1) for j in b.per_example_grads], axis=1)
        g = flat(b.grads)
        p_minus = 1.0 / (beta / pvar + (1 - beta) / prior)
        Pm = np.diag(p_minus)
        S = (B / (1 - beta)) * np.eye(B) + J @ Pm @ J.T
        K = Pm @ J.T @ np.linalg.inv(S)
        P_plus = Pm - K @ J @ Pm
        theta = theta - lr * P_plus @ g
        pvar = np.diag(P_plus).copy()
        # the core
        upd, state = opt.update(mlp.grad(p, xb, yb), state, p,
                                stats=mlp.stats(p, xb, yb, kind="per_example"))
        p = gc.apply_updates(p, upd)
        assert rel_err(flat(backend.tree_numpy(p)), theta) < 1e-12
        got_p = np.concatenate([np.ravel(backend.to_numpy(state.curvature.diagonal[i]))
                                for i in range(4)])
        assert rel_err(got_p, pvar) < 1e-12


def test_diagonal_belief(numpy_backend, problem):
    mlp, params, x, y = problem
    beta, prior = 0.8, 2.0
    opt = gc.rkalman(**NO_CLIP, lr=1.0, rho=0.0, structure="diagonal", kalman_decay=beta,
                     prior_var=prior)
    state = opt.init(params)
    pvar = [np.full(v.shape, prior) for v in params]
    p = params
    for _ in range(3):
        b = mlp.batch(p, x, y, per_example=True)
        q = [np.mean(j * j, axis=0) for j in b.per_example_grads]
        pvar = [1 / (1 / (1 / (beta / pv + (1 - beta) / prior)) + (1 - beta) * qi)
                for pv, qi in zip(pvar, q)]
        expected = [v - pv * g for v, pv, g in zip(p, pvar, b.grads)]
        upd, state = opt.update(b.grads, state, p, stats=mlp.stats(p, x, y, kind="per_example"))
        p = gc.apply_updates(p, upd)
        assert rel_err(flat(p), flat(expected)) < 1e-13


def test_kfac_belief_tracks_the_inverse_of_its_factors(numpy_backend):
    """P_A, carried by predict + RLS correction alone (no refresh), stays the inverse of the
    carried damped factor A_λ,t. The one-step predict leaves an error of at most
    ((1−β)/β)² (§3.3: the step squares ‖I − M X₀‖ ≤ (1−β)/β), reached in the directions where
    the damping dominates (here n = 4 < d, rank-deficient batches); it does not accumulate."""
    rs = np.random.default_rng(5)
    mlp = MLP((6, 8, 3), activation="tanh", loss="softmax_ce")
    params = mlp.init(seed=0)
    opt = gc.rkalman(**NO_CLIP, lr=0.0, rho=0.0, structure="kfac", damping=1e-2, ema_decay=0.95,
                     inverse_every=10_000, ns_tol=1e-13, ns_max_iter=100)
    state = opt.init(params, layers=mlp_layers(mlp))
    worst = 0.0
    for t in range(1, 31):
        x = rs.normal(size=(4, 6))  # n = 4 < d: the n × n RLS correction is used
        y = np.eye(3)[rs.integers(0, 3, 4)]
        _, state = opt.update(mlp.grad(params, x, y), state, params,
                              stats=mlp.stats(params, x, y, kind="layers"),
                              curvature=True, inverse=t == 1)
        for entry in gc.codec.encode(state)["kfac"].values():
            for F, P in (("A", "A_inv"), ("S", "S_inv")):
                worst = max(worst, rel_err(entry[P], np.linalg.inv(entry[F])))
    assert worst < 1.05 * ((1 - 0.95) / 0.95) ** 2


def test_kfac_belief_first_step_is_exact(numpy_backend, problem):
    mlp, params, x, y = problem
    lam = 1e-2
    opt = gc.rkalman(**NO_CLIP, lr=1.0, rho=0.0, structure="kfac", damping=lam, ns_tol=1e-13)
    state = opt.init(params, layers=mlp_layers(mlp))
    upd, state = opt.update(mlp.grad(params, x, y), state, params,
                            stats=mlp.stats(params, x, y, kind="layers"), curvature=True,
                            inverse=False)
    ls = mlp.batch(params, x, y, layer_stats=True).layers[0]
    a = np.concatenate([ls.inputs, np.ones((5, 1))], axis=1)
    s = ls.output_grads
    A, S = a.T @ a / 5, s.T @ s / 5
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(S) / len(S)))
    entry = gc.codec.encode(state)["kfac"]["0/1/N"]
    assert rel_err(entry["A_inv"], np.linalg.inv(A + pi * np.sqrt(lam) * np.eye(len(A)))) < 1e-10
    assert rel_err(entry["S_inv"], np.linalg.inv(S + np.sqrt(lam) / pi * np.eye(len(S)))) < 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spectral_estimate_of_a_zero_residual_is_zero_without_warnings(dtype):
    """The predict's convergence test at the first update (R = 0): the power iteration's
    normalisation must not divide 0 by 0 (float32's 1e-300 is 0)."""
    import warnings

    import array_api_compat

    from grng_core.kalman import _spectral_estimate

    R = np.zeros((5, 5), dtype=dtype)
    R2 = np.diag(np.arange(1.0, 6.0)).astype(dtype)
    xp = array_api_compat.array_namespace(R)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(_spectral_estimate(R, xp)) == 0.0
        assert abs(float(_spectral_estimate(R2, xp)) - 5.0) < 0.5  # ‖R‖₂ = 5, estimated
