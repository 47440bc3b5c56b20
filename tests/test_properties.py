"""Property tests (Hypothesis) of the core's update over random shapes, scales, dtypes
(float32/float64) and hyperparameters, for every optimizer x structure of the table in
tests/cases.py (the estimator and finite-difference scheme drawn too):

1. finite input gives a finite update, the step is taken (not skipped), and the state's
   shapes and dtypes never change;
2. a step with lr = 0 leaves the parameters bit-identical;
3. a non-finite entry anywhere in the input skips the step: parameters and state unchanged
   except `skipped`, which goes up by one.

Profiles (tests/reliability/hypothesis_profiles.py): GRNG_HYPOTHESIS_PROFILE=ci (default,
270 cases per property, 810 in all) or =full (3,600 per property, 10,800 in all).
"""

from __future__ import annotations

import collections
import json
import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import event, given, note, reject
from hypothesis import strategies as st

import grng_core as gc
from tests.cases import FD_SCHEMES, pairs, select, variants
from tests.reliability import known_bugs
from tests.reliability.hypothesis_profiles import settings_for_tests
from tests.reliability.problems import (
    Problem,
    available_backends,
    leaves,
    paths,
    same_bits,
    signature,
    snapshot,
    to_np,
    with_value,
)

# Outcome counts per test item (cases that ran to the end, cases rejected and why), written
# as JSON lines to $GRNG_RELIABILITY_STATS when set: the numbers reported for the full run.
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(autouse=True)
def _count_outcomes(request):
    yield
    path = os.environ.get("GRNG_RELIABILITY_STATS")
    if path and request.node.nodeid in COUNTS:
        with open(path, "a") as f:
            f.write(json.dumps({"test": request.node.nodeid,
                                **COUNTS[request.node.nodeid]}) + "\n")


def _count(request, outcome):
    COUNTS[request.node.nodeid][outcome] += 1


PAIRS = pairs()  # every optimizer x structure of the table (tests/cases.py)
IDS = [f"{a}-{s}" for a, s in PAIRS]
# the estimators drawn per pair: each of the table's, finite differences with every scheme
ESTIMATOR_CASES = {(a, s): variants(select(optimizer=a, structure=s, bare=True),
                                    fd_scheme=FD_SCHEMES) for a, s in PAIRS}
BACKENDS = [b for b in ("numpy", "torch") if b in available_backends()]
SETTINGS = settings_for_tests()


def log_uniform(lo, hi):
    return st.floats(lo, hi).map(lambda e: 10.0 ** e)


@st.composite
def cases(draw, algorithm, structure, lr=None):
    """A problem (MLP shapes, scales, dtype, backend) and an optimizer with drawn settings."""
    dtype = draw(st.sampled_from(["float64", "float32"]))
    backend = draw(st.sampled_from(BACKENDS))
    d_in = draw(st.integers(1, 6))
    hidden = draw(st.lists(st.integers(1, 8), max_size=2))
    d_out = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 10))
    activation = draw(st.sampled_from(["tanh", "relu"]))
    loss = draw(st.sampled_from(["softmax_ce", "mse"]))
    bias = draw(st.booleans())
    x_scale = draw(log_uniform(-3, 2))
    param_scale = draw(log_uniform(-2, 0.5))
    seed = draw(st.integers(0, 2**16))

    config = ESTIMATOR_CASES[(algorithm, structure)][0]
    if algorithm != "ring":
        config = draw(st.sampled_from(ESTIMATOR_CASES[(algorithm, structure)]))
    low_damping = -6 if dtype == "float64" else -3
    hp = dict(
        lr=draw(log_uniform(-4, -1)) if lr is None else lr,
        rho=draw(st.one_of(st.just(0.0), log_uniform(-4, -0.5))),
        damping=draw(log_uniform(low_damping, 0)),
        momentum=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.95))),
        weight_decay=draw(st.one_of(st.just(0.0), log_uniform(-5, -1))),
        ema_decay=draw(st.floats(0.55, 0.99)),
        curvature_every=draw(st.integers(1, 3)),
        inverse_every=draw(st.integers(1, 4)),
        kl_clip=draw(st.one_of(st.none(), log_uniform(-4, 0))),
        inverse_method=draw(st.sampled_from(["newton_schulz", "cholesky"])),
        state_dtype=draw(st.sampled_from([None, "float32", "float64"])),
    )
    if algorithm != "ring":
        hp["fd_radius"] = draw(log_uniform(-4, -1))
    if algorithm == "rkalman":
        hp.update(kalman_decay=draw(st.floats(0.5, 0.99)), prior_var=draw(log_uniform(-1, 1)))
    opt = config.build(**hp)
    problem = Problem.make(backend, dtype, sizes=(d_in, *hidden, d_out), batch=batch,
                           activation=activation, loss=loss, bias=bias, seed=seed,
                           x_scale=x_scale, param_scale=param_scale)
    n_steps = draw(st.integers(1, 4))
    note(f"{config.id} {backend} {dtype} sizes={(d_in, *hidden, d_out)} B={batch} "
         f"{activation} {loss} bias={bias} x_scale={x_scale:.3g} "
         f"param_scale={param_scale:.3g} seed={seed} steps={n_steps} hp={hp}")
    return problem, opt, n_steps


def _finite(tree) -> bool:
    return all(np.all(np.isfinite(to_np(x))) for x in leaves(tree)
               if np.issubdtype(to_np(x).dtype, np.floating))


def _stats_arrays(stats) -> list:
    out = list(stats.per_example_grads or [])
    for ls in stats.layers or []:
        out += [ls.inputs, ls.output_grads]
    return out


def _params_signature(params):
    return [(tuple(p.shape), str(p.dtype)) for p in params]


def _state_dtype(opt, problem) -> str:
    return opt.config.state_dtype or ("float64" if problem.dtype == "float64"
                                              else "float32")


def _take_steps(problem, opt, n_steps, check, count):
    """n_steps updates; returns (params, state), or None when an open core bug (known_bugs.py)
    explains a failure: the case is then rejected and counted as a Hypothesis event."""
    params = problem.params()
    state = problem.init(opt, params)
    sig, psig = signature(state), _params_signature(params)
    for i in range(n_steps):
        grads, stats, oracle = problem.inputs(opt, params)
        if not (_finite(grads) and _finite(_stats_arrays(stats))):
            count(f"passed, stopped after {i} steps: the model's own gradients overflowed")
            return params, state
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="non-finite values",
                                    category=RuntimeWarning)
            warnings.filterwarnings("ignore", message="overflow|invalid value|divide by zero",
                                    category=RuntimeWarning)
            try:
                updates, state = opt.update(grads, state, params, stats=stats,
                                            oracle=oracle)
            except gc.InverseError:  # documented; accepted only where float32 runs out
                if _state_dtype(opt, problem) != "float32":
                    raise
                event("InverseError in float32")
                count("rejected: InverseError in float32")
                reject()
            except (Exception, RuntimeWarning) as e:
                bug = known_bugs.tolerated(opt, _state_dtype(opt, problem), e)
                if bug is None:
                    raise
                event(bug)
                count(f"rejected: {bug}")
                reject()
        check(i, params, updates, state)
        assert signature(state) == sig, "state shapes or dtypes changed"
        assert _params_signature(updates) == psig, "updates differ from params in shape/dtype"
        params = gc.apply_updates(params, updates)
        assert _params_signature(params) == psig
    count("passed")
    return params, state


@pytest.mark.parametrize("algorithm,structure", PAIRS, ids=IDS)
def test_finite_input_gives_finite_update(algorithm, structure, request):
    @SETTINGS
    @given(cases(algorithm, structure))
    def prop(case):
        problem, opt, n_steps = case

        def check(i, params, updates, state):
            assert _finite(updates), f"non-finite update at step {i + 1}"
            assert _finite(state), f"non-finite state at step {i + 1}"
            assert int(to_np(state.skipped)) == 0
            assert int(to_np(state.step)) == i + 1

        _take_steps(problem, opt, n_steps, check, lambda o: _count(request, o))

    prop()


@pytest.mark.parametrize("algorithm,structure", PAIRS, ids=IDS)
def test_zero_learning_rate_leaves_parameters_unchanged(algorithm, structure, request):
    @SETTINGS
    @given(cases(algorithm, structure, lr=0.0))
    def prop(case):
        problem, opt, n_steps = case
        start = snapshot(problem.params())

        def check(i, params, updates, state):
            assert _finite(state)
            assert int(to_np(state.step)) == i + 1

        params, _ = _take_steps(problem, opt, n_steps, check, lambda o: _count(request, o))
        assert same_bits(snapshot(params), start), "lr=0 moved the parameters"

    prop()


def _targets(opt):
    out = ["grads"]
    if opt.requirements.hvp_fn or opt.requirements.grad_fn:
        out.append("oracle")
    if opt.requirements.per_example_grads:
        out.append("per_example")
    if opt.requirements.layer_stats:
        out.append("layers")
    return out


@pytest.mark.parametrize("algorithm,structure", PAIRS, ids=IDS)
def test_nonfinite_input_skips_the_step(algorithm, structure, request):
    @SETTINGS
    @given(cases(algorithm, structure), st.data())
    def prop(case, data):
        problem, opt, n_steps = case
        be = problem.be
        params = problem.params()
        state = problem.init(opt, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                for _ in range(n_steps - 1):
                    params, state, _ = problem.step(opt, params, state)
            except gc.InverseError:  # documented; accepted only where float32 runs out
                if _state_dtype(opt, problem) != "float32":
                    raise
                _count(request, "rejected: InverseError in float32")
                reject()
        if not (_finite(params) and _finite(state)):
            _count(request, "rejected: diverged before the bad step")
            reject()
        grads, stats, oracle = problem.inputs(opt, params)
        if not _finite(grads):
            _count(request, "rejected: model overflowed")
            reject()
        targets = _targets(opt)
        if not opt.flags(int(to_np(state.step)))[0]:
            # a step that updates no curvature does not consume statistics: a NaN there is
            # not used (the factored form's probe check fails on it and preconditions densely)
            targets = [t for t in targets if t not in ("per_example", "layers")]
        if be.name == "torch" and known_bugs.torch_nonfinite_cholesky():
            targets = [t for t in targets if t in ("grads", "oracle")]  # see known_bugs.py
        if opt.requirements.grad_fn and not any(np.any(to_np(g) != 0) for g in grads):
            targets.remove("oracle")  # ‖g‖ = 0: ĝ = g, the shifted gradient is not used (§1)
        where = data.draw(st.sampled_from(targets), label="where")
        value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")

        def spoil(arr):
            a = to_np(arr)
            index = tuple(data.draw(st.integers(0, n - 1)) for n in a.shape)
            return with_value(be, arr, value, index)

        if where == "grads":
            grads = list(grads)
            i = data.draw(st.integers(0, len(grads) - 1), label="leaf")
            grads[i] = spoil(grads[i])
        elif where == "per_example":
            pe = list(stats.per_example_grads)
            i = data.draw(st.integers(0, len(pe) - 1), label="leaf")
            pe[i] = spoil(pe[i])
            stats = stats._replace(per_example_grads=pe)
        elif where == "layers":
            ls = list(stats.layers)
            i = data.draw(st.integers(0, len(ls) - 1), label="layer")
            field = data.draw(st.sampled_from(["inputs", "output_grads"]), label="field")
            ls[i] = ls[i]._replace(**{field: spoil(getattr(ls[i], field))})
            stats = stats._replace(layers=ls)
        else:
            fn_name = "hvp_fn" if opt.requirements.hvp_fn else "grad_fn"
            fn = getattr(oracle, fn_name)
            i = data.draw(st.integers(0, len(params) - 1), label="leaf")

            def spoiled(*args):
                out = list(fn(*args))
                out[i] = spoil(out[i])
                return out

            oracle = oracle._replace(**{fn_name: spoiled})

        keep = [(p, x) for p, x in zip(paths(state), snapshot(state)) if p != "/skipped"]
        before_params = snapshot(params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            updates, new_state = opt.update(grads, state, params, stats=stats, oracle=oracle)
        new_params = gc.apply_updates(params, updates)
        assert same_bits(snapshot(new_params), before_params)
        after = [(p, x) for p, x in zip(paths(new_state), snapshot(new_state))
                 if p != "/skipped"]
        assert [p for p, _ in after] == [p for p, _ in keep]
        assert same_bits([x for _, x in after], [x for _, x in keep])
        assert int(to_np(new_state.skipped)) == int(to_np(state.skipped)) + 1
        assert any("non-finite" in str(w.message) for w in caught)
        _count(request, "passed")

    prop()
