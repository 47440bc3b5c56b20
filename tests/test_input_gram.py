"""Input rows reduced as they arrive (`grng_core.InputGram`, ALGORITHMS.md §2.1 "Input rows
reduced early"): the core's steps, statistics and first-step check from an InputGram equal
those from the rows themselves, in float64 (NumPy); checked against dense products of the
rows with their ones column."""

import numpy as np
import pytest

import grng_core as gc
from grng_core.requirements import requirements
from grng_core.structures import input_gram
from grng_core.structures.factored import cheaper, probes
from grng_core.structures.rows import augmented

RNG = np.random.default_rng(3)
B, T, DIN, DOUT = 4, 5, 6, 3  # n = B·T = 20 rows ≥ d_in' = 7: shared weights, 2 calls


def _gram(a, bias):
    return input_gram.reduce_rows(a, bias, np, np.float64)


@pytest.mark.parametrize("bias", [True, False])
def test_reduced_rows_give_the_dense_products(bias):
    a = RNG.standard_normal((17, DIN))
    g = input_gram.combine([_gram(a[:9], bias), _gram(a[9:], bias)], np)
    a1 = np.concatenate([a, np.ones((17, 1))], axis=1) if bias else a
    np.testing.assert_allclose(augmented(g, bias, np), a1.T @ a1, rtol=1e-13)
    np.testing.assert_allclose(g.probed, probes(a1.shape[1], np, np.float64, "cpu") @ a1.T,
                               rtol=1e-13, atol=1e-13)
    assert g.n == 17


def test_reducible_only_where_the_factored_form_reads_no_rows():
    for d_out, d_in_ext in [(3, 7), (1024, 785), (10, 4096), (4096, 10)]:
        for n in range(1, 3 * max(d_in_ext, d_out), max(1, d_in_ext // 7)):
            if input_gram.reducible(d_out, d_in_ext, n):
                assert n >= d_in_ext and not cheaper(d_out, d_in_ext, n)
                assert not cheaper(d_out, d_in_ext, 3 * n)  # the passes' rows stacked
        assert input_gram.reducible(d_out, d_in_ext, d_in_ext + max(d_out, d_in_ext))


def _problem(bias):
    params = {"w": RNG.standard_normal((DOUT, DIN)) * 0.3}
    specs = [gc.LayerSpec("w", "b" if bias else None)]
    if bias:
        params["b"] = RNG.standard_normal(DOUT) * 0.1
    batches = []
    for _ in range(4):
        a = [RNG.standard_normal((B * T // 2, DIN)) for _ in range(2)]  # two calls
        s = RNG.standard_normal((B * T, DOUT))
        a_all = np.concatenate(a)
        g = {"w": s.T @ a_all / B}
        if bias:
            g["b"] = s.sum(0) / B
        batches.append((a, s, g))
    return params, specs, batches


def _stats(a, s, bias, reduced):
    inputs = (input_gram.combine([_gram(x, bias) for x in a], np) if reduced
              else np.concatenate(a))
    return gc.Stats(layers=[gc.LayerStats("w", "b" if bias else None, inputs, s,
                                          batch_size=B)])


@pytest.mark.parametrize("name", ["ring", "reng", "ngd"])
@pytest.mark.parametrize("bias", [True, False])
def test_steps_from_reduced_rows_equal_those_from_rows(name, bias):
    build = {"ring": lambda: gc.ring(lr=0.1, damping=1e-2, curvature_every=2, inverse_every=2,
                                     refresh_warmup=0),
             "reng": lambda: gc.reng(lr=0.1, damping=1e-2, gr="finite_difference"),
             "ngd": lambda: gc.reng(lr=0.1, damping=1e-2, rho=0.0)}[name]
    params, specs, batches = _problem(bias)
    runs = []
    for reduced in (False, True):
        opt = build()
        assert opt.requirements.input_gram
        state, p = opt.init(params, layers=specs), dict(params)
        oracle = gc.Oracle(grad_fn=lambda q: {k: 0.9 * v for k, v in batches[0][2].items()})
        ups = []
        for a, s, g in batches:
            u, state = opt.update(g, state, p, _stats(a, s, bias, reduced), oracle=oracle)
            p = {k: p[k] + u[k] for k in p}
            ups.append(u)
        runs.append((ups, state))
    for u0, u1 in zip(runs[0][0], runs[1][0]):
        for k in u0:
            np.testing.assert_allclose(u1[k], u0[k], rtol=1e-11, atol=1e-14)
    A0, A1 = runs[0][1].curvature.kfac[0].A, runs[1][1].curvature.kfac[0].A
    np.testing.assert_allclose(A1, A0, rtol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_the_first_step_check_reads_the_reduced_rows(tied):
    params, specs, batches = _problem(True)
    a, s, g = batches[0]
    if tied:  # a second use of the weight that the hooked calls do not see
        g = dict(g, w=g["w"] + 0.5 * RNG.standard_normal(g["w"].shape))
    opt = gc.ring()
    state = opt.init(params, layers=specs)
    for reduced in (False, True):
        assert opt.unexplained(g, state, params, _stats(a, s, True, reduced)) == (
            ["w"] if tied else [])


def test_r_kalman_asks_for_rows_and_refuses_a_gram():
    assert not requirements(gc.rkalman().config).input_gram
    params, specs, batches = _problem(False)
    opt = gc.rkalman()
    state = opt.init(params, layers=specs)
    a, s, g = batches[0]
    with pytest.raises(ValueError, match="observes the input rows"):
        opt.update(g, state, params, _stats(a, s, False, True),
                   oracle=gc.Oracle(grad_fn=lambda q: g))
