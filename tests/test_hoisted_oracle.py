"""grng_core.hoisted_oracle: ĝ's oracle passes run ahead of the step and replayed give the
same update as the step calling the oracle itself (exactly: the same NumPy operations), the
replayed step calls the real oracle no more, and every estimator of §1 is covered (RENG's
double backprop and finite differences, R-Kalman's forward differences, with `own_base`)."""

from __future__ import annotations

import numpy as np
import pytest

import grng_core as gc
from grng_core import hoisted_oracle
from tests.reliability.problems import Problem, leaves, to_np

BUILDS = {
    "reng double_backprop": lambda: gc.reng(lr=0.1, rho=0.05, damping=1e-2, structure="kfac"),
    "reng finite_difference": lambda: gc.reng(lr=0.1, rho=0.05, damping=1e-2, structure="kfac",
                                              gr="finite_difference"),
    "reng central": lambda: gc.reng(lr=0.1, rho=0.05, damping=1e-2, structure="diagonal",
                                    gr="finite_difference", fd_scheme="central"),
    "rkalman": lambda: gc.rkalman(lr=0.5, rho=0.05, damping=1e-2, structure="kfac"),
}


def _counting(oracle, counts, own_base):
    def wrap(kind, fn):
        def call(*args):
            counts[kind] += 1
            return fn(*args)
        return None if fn is None else call
    return gc.Oracle(grad_fn=wrap("grad", oracle.grad_fn), hvp_fn=wrap("hvp", oracle.hvp_fn),
                     own_base=own_base)


@pytest.mark.parametrize("own_base", [False, True], ids=["given-base", "own-base"])
@pytest.mark.parametrize("name", list(BUILDS))
def test_replayed_oracle_gives_the_same_steps_with_no_more_passes(name, own_base):
    problem = Problem.make("numpy")
    opt = BUILDS[name]()
    specs = problem.layer_specs() if opt.config.structure == "kfac" else None
    runs = {}
    for hoist in (False, True):
        params = problem.params()
        state = opt.init(params, layers=specs) if specs else opt.init(params)
        counts = {"grad": 0, "hvp": 0}
        in_step = []
        for _ in range(3):
            grads, stats, oracle = problem.inputs(opt, params)
            oracle = _counting(oracle, counts, own_base)
            if hoist:
                h = hoisted_oracle.hoist(opt, grads, state, params, oracle)
                assert h is not None
                before = dict(counts)
                oracle = h.replay()
            else:
                before = dict(counts)
            updates, state = opt.update(grads, state, params, stats=stats, oracle=oracle)
            in_step.append(sum(counts.values()) - sum(before.values()))
            params = gc.apply_updates(params, updates)
        runs[hoist] = ([to_np(p) for p in params], [to_np(x) for x in leaves(state)],
                       counts, in_step)
    (p0, s0, c0, steps0), (p1, s1, c1, steps1) = runs[False], runs[True]
    for a, b in zip(p0 + s0, p1 + s1):
        np.testing.assert_array_equal(a, b)
    assert c0 == c1  # the same passes, run once each
    assert all(n > 0 for n in steps0)  # the step itself called the oracle
    assert steps1 == [0, 0, 0]  # the replayed step called it no more


def test_nothing_to_hoist_for_ring_or_rho_zero():
    problem = Problem.make("numpy")
    for opt in (gc.ring(structure="kfac"), gc.reng(rho=0.0, structure="kfac")):
        params = problem.params()
        state = opt.init(params, layers=problem.layer_specs())
        grads, _, oracle = problem.inputs(opt, params)
        assert hoisted_oracle.hoist(opt, grads, state, params, oracle) is None
