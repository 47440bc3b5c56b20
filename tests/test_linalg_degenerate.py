"""Inverses under degenerate curvature (grng_core/linalg.py, and the structures that call it):
all-zero activations, dead ReLU layers, batches smaller than
the layer width (rank-deficient factors), damping down to 1e-12, parameters scaled by 1e-6 and
1e6. No NaN or Inf may reach the parameters or the state; every inverse is either Newton–Schulz
converged, the Cholesky fallback, or the documented `InverseError`; never a silently wrong
inverse (checked against numpy.linalg.inv in float64).
"""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest

import grng_core as gc
import grng_core.linalg as gl
from grng_core.structures import kfac
from tests import cases
from tests.reliability import known_bugs
from tests.reliability.problems import (
    CASES,
    Problem,
    all_finite,
    available_backends,
    degenerate_problem,
    is_backend_linalg_error,
    leaves,
    to_np,
)

# every optimizer x structure with its builder's estimator, the builders' defaults
CONFIGS = cases.select(default_estimator=True, bare=True)
EAGER = [b for b in available_backends() if b in ("numpy", "torch")]
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


def inverse_error_bound(M: np.ndarray, dtype: str, tol: float) -> float:
    """What a correct inverse of M achieves: the Newton–Schulz tolerance, or (the Cholesky
    fallback) the precision limit cond(M)·eps; a factor 10 of slack."""
    d = M.shape[0]
    return 10.0 * (math.sqrt(d) * tol + np.linalg.cond(M) * EPS[dtype])


def check_kfac_inverses(opt, state, dtype):
    """Every K-FAC inverse in the state against numpy.linalg.inv of its matrix, in float64."""
    if "kfac" not in state:
        return
    tol = opt.config.ns_tol or gl.default_tol(getattr(np, dtype), np)
    damping = opt.config.damping
    for key, e in gc.codec.encode(state)["kfac"].items():
        A, S = to_np(e["A"]).astype(np.float64), to_np(e["S"]).astype(np.float64)
        if opt.name == "rkalman":  # the carried factors are already damped (§3.3)
            pairs = ((A, e["A_inv"]), (S, e["S_inv"]))
        else:
            A_l, S_l = kfac.damped(A, S, np.sqrt(damping), np)
            pairs = ((np.asarray(A_l), e["A_inv"]), (np.asarray(S_l), e["S_inv"]))
        for M, X in pairs:
            X = to_np(X).astype(np.float64)
            ref = np.linalg.inv(M)
            err = np.linalg.norm(X - ref) / np.linalg.norm(ref)
            bound = inverse_error_bound(M, dtype, tol)
            assert err <= bound, (f"layer {key}: inverse off by {err:.2e} (bound {bound:.2e}, "
                                  f"cond {np.linalg.cond(M):.2e})")


def run_steps(pr, opt, n):
    params = pr.params()
    state = pr.init(opt, params)
    for _ in range(n):
        params, state, _ = pr.step(opt, params, state)
    return params, state


BACKEND_LINALG_BUG = (
    "core bug: a finite but numerically singular SPD system (float32, damping below the "
    "precision) makes xp.linalg.cholesky fail in grng_core/linalg.py cholesky_inverse: the "
    "inverse is NaN (formerly the backend's LinAlgError) and the step is skipped although "
    "the input is finite; expected InverseError (eager) or a jittered, finite inverse")


RKALMAN_PREDICT_BUG = (
    "core bug: grng_core/kalman.py _predict_correct assumes ||I - M X0|| <= (1-beta)/beta, "
    "which fails when the damping split pi changes between steps; the one-step Newton-Schulz "
    "predict P- is then indefinite and the RLS system is not positive definite (LinAlgError "
    "in numpy/torch, NaN and a skipped step under jax)")


def _rkalman_predict_bug(config, case, dtype, damping) -> bool:
    return (config.optimizer, config.structure) == ("rkalman", "kfac") and (
        case == "params_1e-6" and dtype == "float64" and damping == 1e-3
    ) and known_bugs.rkalman_predict()


@pytest.mark.parametrize("damping", [1e-3, 1e-12], ids=["damping1e-3", "damping1e-12"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
@pytest.mark.parametrize("backend_name", EAGER)
def test_degenerate_curvature_eager(backend_name, config, case, dtype, damping, request):
    """Allowed outcomes: steps that are taken (never skipped: the input is finite) with finite
    parameters and state and correct inverses, or InverseError. Nothing else.

    float64 must always succeed. In float32 a damping of 1e-12 is below the precision, and
    whether Cholesky meets a singular pivot depends on the BLAS: while the core bugs of
    tests/reliability/known_bugs.py are open (each reproduced deterministically by a strict
    xfail test below), a failure they explain is reported as xfail, never as a pass.
    """
    pr = degenerate_problem(case, backend_name, dtype)
    hp = dict(damping=damping)
    if config.optimizer == "rkalman":
        hp.update(inverse_every=3)  # steps 1 and 4 refresh P directly: checked below
    opt = config.build(**hp)
    try:
        with warnings.catch_warnings():
            # a skipped step warns: fail on it (numpy's own overflow warnings are let through)
            warnings.filterwarnings("error", message="non-finite values", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message="overflow|invalid value",
                                    category=RuntimeWarning)
            params, state = run_steps(pr, opt, 4)
    except gc.InverseError as e:
        assert dtype == "float32" or damping < 1e-6, f"InverseError on an easy problem: {e}"
        assert "raise damping" in str(e)
        return
    except (Exception, RuntimeWarning) as e:
        bug = known_bugs.tolerated(opt, dtype, e)
        if bug is not None:
            pytest.xfail(f"{bug} ({type(e).__name__}: {e})")
        raise
    assert int(to_np(state.skipped)) == 0
    assert all_finite(params) and all_finite(state)
    check_kfac_inverses(opt, state, dtype)


def test_rkalman_kfac_predict_survives_a_change_of_pi():
    """Deterministic reproduction in float64: parameters scaled by 1e-6 make the output
    gradients tiny, pi sits at its clamp 1e4, then the first steps grow the parameters and pi
    drops to ~360: the S shift grows 28x and ||I - M X0|| = 1.44 > 1 on step 3."""
    pr = degenerate_problem("params_1e-6", "numpy", "float64")
    opt = cases.get("rkalman/kfac/fin_diff:forward", bare=True).build(damping=1e-3)
    params, state = run_steps(pr, opt, 3)
    assert int(state.skipped) == 0 and all_finite(params) and all_finite(state)


@pytest.mark.parametrize("backend_name", EAGER)
@pytest.mark.parametrize("config", cases.select(optimizer=("reng", "ring"), structure="woodbury",
                                                default_estimator=True, bare=True),
                         ids=lambda c: c.optimizer)
def test_singular_woodbury_system_float32(backend_name, config):
    """A deterministic reproduction: per-example gradients +e1 and -e1 make J Jᵀ = [[1, -1],
    [-1, 1]] exactly; λB = 2e-12 vanishes next to 1 in float32, so the B × B system is exactly
    singular. The step must be finite or raise InverseError, not the backend's LinAlgError."""
    from tests.backends import get_backend

    be = get_backend(backend_name)
    params = [be.asarray(np.zeros(3), "float32")]
    pe = [be.asarray(np.array([[1.0, 0, 0], [-1.0, 0, 0]]), "float32")]
    grads = [be.asarray(np.zeros(3), "float32")]
    opt = config.build(lr=0.1, rho=0.0, damping=1e-12)
    state = opt.init(params)
    try:
        updates, state = opt.update(grads, state, params,
                                    stats=gc.Stats(per_example_grads=pe))
    except gc.InverseError:
        return
    assert all_finite(updates) and int(to_np(state.skipped)) == 0


# ------------------------------------------------------------------ jax under jit
# one compile each (XLA compiles dominate the CI time): every algorithm, both structures
# with a matrix inverse, both dtypes
JIT_CASES = [(cases.get(label, bare=True), dtype) for label, dtype in (
    ("reng/kfac/double_bp", "float32"), ("ring/woodbury/-", "float32"),
    ("ring/kfac/-", "float64"), ("rkalman/kfac/fin_diff:forward", "float64"))]


def _jit_step(config, ref):
    import jax

    @jax.jit
    def step(params, state, x, y, damping):
        # damping as a schedule closing over a traced argument: one compile for all values
        opt = config.build(damping=lambda t: damping, ns_max_iter=8)
        grads, stats, oracle = ref.inputs(opt, params, x, y)
        updates, state = opt.update(grads, state, params, stats=stats, oracle=oracle)
        return gc.apply_updates(params, updates), state

    return step


@pytest.mark.skipif("jax" not in available_backends(), reason="jax not installed")
@pytest.mark.parametrize("config,dtype", JIT_CASES, ids=[f"{c.id}-{d}" for c, d in JIT_CASES])
def test_degenerate_curvature_jit(config, dtype):
    """Under jit nothing can be raised: the parameters and state stay finite whatever happens;
    in float64 no step is skipped. Every case has the shapes of `batch_lt_width` (batch 2,
    width 24, so every factor is rank-deficient) and one compiled step serves them all."""
    import jax

    ref = degenerate_problem("batch_lt_width", "jax", dtype)
    step = _jit_step(config, ref)
    dev = jax.devices()[0]
    for case in CASES:
        pr = degenerate_problem("batch_lt_width", "jax", dtype)
        pr.params_np = [{"params_1e-6": 1e-6, "params_1e6": 1e6}.get(case, 1.0) * p
                        for p in pr.params_np]
        if case == "zero_inputs":
            pr.x_np = np.zeros_like(pr.x_np)
        if case == "dead_relu":  # tanh here: saturate every hidden unit instead
            pr.params_np[1] = np.full_like(pr.params_np[1], -100.0)
        for damping in (1e-3, 1e-12):
            if _rkalman_predict_bug(config, case, dtype, damping):
                continue  # test_rkalman_kfac_predict_survives_a_change_of_pi (under jit
                # the same bug shows as NaN and a skipped step)
            opt = config.build(damping=damping, ns_max_iter=8)
            params = jax.device_put(pr.params(), dev)
            state = pr.init(opt, params)
            d = jax.numpy.asarray(damping, dtype=dtype)
            for _ in range(3):
                params, state = step(params, state, pr.x, pr.y, d)
            assert all_finite(params) and all_finite(state), (case, damping)
            if dtype == "float64":
                assert int(state.skipped) == 0, (case, damping)
    assert step._cache_size() == 1


# ------------------------------------------------------------------ Newton–Schulz directly
def spd(d, cond, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def _ns_backends():
    out = ["numpy", "array_api_strict"]
    if "torch" in available_backends():
        out.append("torch")
    return out


@pytest.mark.parametrize("backend_name", _ns_backends())
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e8, 1e12])
def test_newton_schulz_never_silently_wrong(backend_name, dtype, cond):
    """The inverse is accurate to what the precision allows, or the failure is loud: all NaN
    (which the optimizer's guard turns into a skipped step) or an exception. A matrix rounded
    to float32 with cond 1e12 is numerically singular: no correct inverse exists there."""
    from tests.backends import get_backend

    be = get_backend(backend_name)
    M = spd(7, cond)
    Mx = be.asarray(M, dtype)
    tol = gl.default_tol(Mx.dtype, be.xp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            X, r = gl.newton_schulz_inverse(Mx, be.xp, tol=tol, max_iter=50, name="M")
        except gc.InverseError as e:  # the loud failure for a numerically singular matrix
            assert dtype == "float32" and cond * EPS[dtype] > 1e-3, f"failed on a solvable {e}"
            assert "M (7 x 7" in str(e) and "raise damping" in str(e)
            return
        except Exception as e:
            if is_backend_linalg_error(e) and known_bugs.singular_cholesky():
                pytest.xfail(BACKEND_LINALG_BUG + f" ({e})")
            raise
    X = to_np(X).astype(np.float64)
    Mr = to_np(Mx).astype(np.float64)  # the matrix actually inverted (rounded to dtype)
    if not np.all(np.isfinite(X)):
        assert np.all(np.isnan(X)), "a failed inverse must be NaN throughout, not partly"
        assert dtype == "float32" and cond * EPS[dtype] > 1e-3, "failed on a solvable matrix"
        return
    err = np.linalg.norm(X - np.linalg.inv(Mr)) / np.linalg.norm(np.linalg.inv(Mr))
    assert err <= inverse_error_bound(Mr, dtype, tol), err
    np.testing.assert_array_equal(X, X.T)  # symmetrised


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_newton_schulz_converges_without_fallback_when_conditioned(dtype):
    import array_api_strict as xps

    for cond in (1.0, 10.0, 1e2) + ((1e3, 1e5) if dtype == "float64" else ()):
        M = xps.asarray(spd(9, cond, seed=1).astype(dtype))
        tol = gl.default_tol(M.dtype, xps)
        X, r = gl.newton_schulz_inverse(M, xps, tol=tol, max_iter=60, fallback=False)
        assert float(r) <= tol, (cond, float(r))
        # a warm start from the converged inverse is already converged
        X2, r2 = gl.newton_schulz_inverse(M, xps, warm=X, tol=tol, max_iter=1, fallback=False)
        assert float(r2) <= tol


def test_newton_schulz_float32_tolerance_floor():
    """Newton–Schulz cannot get the residual below about cond·eps·sqrt(d): in float32 the
    default ns_tol 1e-4 is out of reach once cond(M) is about 1e3, and the inverse comes from
    the Cholesky fallback (accurate to the precision). Documented in FAILURE_BEHAVIOUR.md."""
    import array_api_strict as xps

    M = xps.asarray(spd(9, 1e4, seed=1).astype("float32"))
    _, r = gl.newton_schulz_inverse(M, xps, tol=1e-4, max_iter=100, fallback=False)
    assert float(r) > 1e-4
    X, _ = gl.newton_schulz_inverse(M, xps, tol=1e-4, max_iter=100)
    Mr = np.asarray(M).astype(np.float64)
    err = np.linalg.norm(np.asarray(X) - np.linalg.inv(Mr)) / np.linalg.norm(np.linalg.inv(Mr))
    assert err <= inverse_error_bound(Mr, "float32", 1e-4)


class NoLinalg(types.ModuleType):
    """A namespace that forwards everything except `linalg` (an array library without it)."""

    def __init__(self, xp):
        super().__init__("no_linalg")
        self._xp = xp

    def __getattr__(self, name):
        if name == "linalg":
            raise AttributeError(name)
        return getattr(self._xp, name)


def test_no_linalg_namespace_converges_or_raises_inverse_error():
    import array_api_strict as xps

    xp = NoLinalg(xps)
    assert not gl.has_linalg(xp)
    M = xps.asarray(spd(6, 1e2))
    X, r = gl.newton_schulz_inverse(M, xp, tol=1e-6, max_iter=60, name="A of layer 'w'")
    assert float(r) <= 1e-6
    np.testing.assert_allclose(np.asarray(X), np.linalg.inv(spd(6, 1e2)), rtol=1e-5)
    bad = xps.asarray(spd(6, 1e12))
    with pytest.raises(gc.InverseError) as info:
        gl.newton_schulz_inverse(bad, xp, tol=1e-6, max_iter=20, name="A of layer 'w'")
    msg = str(info.value)
    for part in ("A of layer 'w'", "did not converge in 20 iterations", "condition estimate",
                 "ns_tol", "raise damping"):
        assert part in msg, msg
    assert issubclass(gc.InverseError, ArithmeticError)


@pytest.fixture
def no_linalg(monkeypatch):
    monkeypatch.setattr(gl, "has_linalg", lambda xp: False)


# RING's adaptive_damping adds ρ‖g‖² to the damping, so a tiny λ does not make it singular
DAMPED = [c for c in CONFIGS
          if (c.structure == "kfac" or (c.structure, c.optimizer) in (("woodbury", "reng"),
                                                                      ("woodbury", "ring")))
          and c.form != "adaptive_damping"]


@pytest.mark.parametrize("config", DAMPED, ids=[c.id for c in DAMPED])
def test_no_linalg_optimizer_raises_inverse_error_naming_the_matrix(config, no_linalg):
    """Without linalg (and inverse_method="cholesky" falls back to Newton–Schulz there), an
    inverse that does not converge raises InverseError naming the matrix."""
    pr = degenerate_problem("batch_lt_width", "numpy", "float64")
    opt = config.build(damping=1e-12, ns_max_iter=5, inverse_method="cholesky")
    name = {"kfac": "layer", "woodbury": "batch system"}[config.structure]
    with pytest.raises(gc.InverseError, match="did not converge in 5 iterations") as info:
        run_steps(pr, opt, 2)
    assert name in str(info.value)


def test_no_linalg_rkalman_woodbury_is_conditioned_by_its_noise(no_linalg):
    """R-Kalman's B × B system S = R + J diag(p) Jᵀ has R = (B/(1-β))·I: it stays well
    conditioned whatever the data, and Newton–Schulz converges in a few iterations."""
    pr = degenerate_problem("batch_lt_width", "numpy", "float64")
    opt = cases.get("rkalman/woodbury/fin_diff:forward", bare=True).build(ns_max_iter=8)
    params, state = run_steps(pr, opt, 3)
    assert all_finite(params) and int(state.skipped) == 0


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.structure != "diagonal"],
                         ids=[c.id for c in CONFIGS if c.structure != "diagonal"])
def test_no_linalg_optimizer_converges_when_damped(config, no_linalg):
    pr = Problem.make("numpy")
    opt = config.build(damping=1e-1, prior_var=10.0)
    params, state = run_steps(pr, opt, 3)
    assert all_finite(params) and all_finite(state)
    assert int(state.skipped) == 0
    check_kfac_inverses(opt, state, "float64")


@pytest.mark.parametrize("config", cases.select(optimizer="ring", structure=("kfac", "woodbury"),
                                                bare=True), ids=cases.idfn)
def test_no_linalg_nonfinite_statistics_skip(config, no_linalg):
    pr = Problem.make("numpy")
    opt = config.build()
    params = pr.params()
    state = pr.init(opt, params)
    grads, stats, oracle = pr.inputs(opt, params)
    if stats.layers is not None:
        ls = stats.layers[0]
        bad = np.array(ls.inputs, copy=True)
        bad[0, 0] = np.nan
        stats = stats._replace(layers=[ls._replace(inputs=bad), *stats.layers[1:]])
    else:
        pe = [np.array(j, copy=True) for j in stats.per_example_grads]
        pe[0][0, 0, 0] = np.nan
        stats = stats._replace(per_example_grads=pe)
    with pytest.warns(RuntimeWarning, match="curvature statistics"):
        updates, new_state = opt.update(grads, state, params, stats=stats, oracle=oracle)
    assert int(new_state.skipped) == 1


@pytest.mark.skipif("jax" not in available_backends(), reason="jax not installed")
def test_no_linalg_under_jit_skips_instead_of_raising(no_linalg):
    """Traced, InverseError cannot be raised: a non-converged inverse becomes NaN, which the
    guard turns into a skipped step (counted in state.skipped)."""
    import jax

    pr = degenerate_problem("batch_lt_width", "jax", "float64")
    opt = gc.ring(damping=1e-12, structure="kfac", ns_max_iter=3)
    params = pr.params()
    state = pr.init(opt, params)

    @jax.jit
    def step(params, state):
        grads, stats, oracle = pr.inputs(opt, params, pr.x, pr.y)
        updates, state = opt.update(grads, state, params, stats=stats, oracle=oracle)
        return gc.apply_updates(params, updates), state

    new_params, new_state = step(params, state)
    assert int(new_state.skipped) == 1
    assert all_finite(new_params) and all_finite(new_state)
    for a, b in zip(new_params, params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rkalman_kfac_carried_inverse_drift_is_bounded():
    """R-Kalman K-FAC carries P without inverting a factor (§3.3); with fewer rows than the
    factor's width P drifts from the exact inverse of the carried factor, within the predict's
    fixed-point bound (about 3e-3 relative in float64 at one predict step). It must stay
    bounded, and the optional direct refresh (kalman_refresh_every) restores it."""
    pr = degenerate_problem("batch_lt_width", "numpy", "float64")
    rng = np.random.default_rng(1)
    for refresh_every, bound in ((None, 1e-2), (1, 1e-5)):
        opt = cases.get("rkalman/kfac/fin_diff:forward", bare=True).build(
            kalman_refresh_every=refresh_every, lr=0.1)
        params = pr.params()
        state = pr.init(opt, params)
        worst = 0.0
        for _ in range(30):
            pr.x_np = rng.standard_normal(pr.x_np.shape)
            params, state, _ = pr.step(opt, params, state)
            for e in gc.codec.encode(state)["kfac"].values():
                for F, P in (("A", "A_inv"), ("S", "S_inv")):
                    ref = np.linalg.inv(e[F])
                    worst = max(worst, np.linalg.norm(e[P] - ref) / np.linalg.norm(ref))
        assert worst <= bound, (refresh_every, worst)


def test_state_leaves_keep_shapes_under_degenerate_input():
    pr = degenerate_problem("dead_relu")
    opt = gc.reng(structure="kfac", damping=1e-12)
    params = pr.params()
    state = pr.init(opt, params)
    shapes = [(tuple(x.shape), x.dtype) for x in leaves(state)]
    for _ in range(3):
        params, state, _ = pr.step(opt, params, state)
    assert [(tuple(np.shape(x)), np.asarray(x).dtype) for x in leaves(state)] == shapes
