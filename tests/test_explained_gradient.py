"""`grng_core.Optimizer.unexplained` (ALGORITHMS.md §2.1 "This project"): a K-FAC layer's
gradient is explained by its calls' rows when G = c·sᵀa/B + α·W for some scalars c (clipping,
a loss scale) and α (an L2 term); a second use of the weight (a functional tie) or a per-element
edit is not. Checked against gradients built in float64 from the rows themselves."""

import numpy as np
import pytest

import grng_core as gc

RNG = np.random.default_rng(0)
N, DIN, DOUT, V = 12, 5, 4, 9


def _dense_case():
    a, s = RNG.standard_normal((N, DIN)), RNG.standard_normal((N, DOUT))
    W, b = RNG.standard_normal((DOUT, DIN)), RNG.standard_normal(DOUT)
    G = s.T @ a / N, s.sum(0) / N  # sᵀ[a 1]/B, the bias column split off
    stats = gc.Stats(layers=[gc.LayerStats("w", "b", a, s)])
    return {"w": W, "b": b}, {"w": G[0], "b": G[1]}, stats, [gc.LayerSpec("w", "b")]


def _embedding_case():
    ids = RNG.integers(0, V, N)
    s = RNG.standard_normal((N, DOUT))
    W = RNG.standard_normal((V, DOUT))  # stored (d_in, d_out), as torch's nn.Embedding
    G = np.zeros((V, DOUT))
    np.add.at(G, ids, s / N)
    stats = gc.Stats(layers=[gc.LayerStats("e", None, ids, s, transposed=True)])
    return {"e": W}, {"e": G}, stats, [gc.LayerSpec("e", None, transposed=True,
                                                    a_diagonal=True)]


CASES = {"dense": _dense_case, "embedding": _embedding_case}


def _unexplained(params, grads, stats, specs):
    opt = gc.ring()
    state = opt.init(params, layers=specs)
    return opt.unexplained(grads, state, params, stats)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("c,alpha", [(1.0, 0.0), (0.3, 0.0), (1.0, 0.05), (0.3, 2.0)])
def test_a_scaled_gradient_with_an_l2_term_is_explained(case, c, alpha):
    params, grads, stats, specs = CASES[case]()
    grads = {k: c * g + alpha * params[k] for k, g in grads.items()}
    assert _unexplained(params, grads, stats, specs) == []


def test_an_l2_term_on_the_weight_only_is_explained():
    params, grads, stats, specs = _dense_case()
    grads = dict(grads, w=0.7 * grads["w"] + 0.3 * params["w"], b=0.7 * grads["b"])
    assert _unexplained(params, grads, stats, specs) == []


def test_a_non_finite_gradient_is_not_reported_here():
    params, grads, stats, specs = _dense_case()
    grads = dict(grads, w=np.where(np.arange(DIN) == 1, np.nan, grads["w"]))
    assert _unexplained(params, grads, stats, specs) == []  # the step's guard reports it


@pytest.mark.parametrize("case", CASES)
def test_a_second_use_of_the_weight_is_not(case):
    params, grads, stats, specs = CASES[case]()
    key = specs[0].weight
    tie = 0.5 * RNG.standard_normal(params[key].shape)  # another use's gradient, say a head
    grads = dict(grads, **{key: grads[key] + tie})
    assert _unexplained(params, grads, stats, specs) == [key]


def test_a_per_element_clip_is_not():
    params, grads, stats, specs = _dense_case()
    cap = 0.3 * np.abs(grads["w"]).max()
    grads = dict(grads, w=np.clip(grads["w"], -cap, cap))
    assert _unexplained(params, grads, stats, specs) == ["w"]


def test_only_kfac_states_with_the_gradients_own_rows_are_checked():
    params, grads, stats, specs = _dense_case()
    grads = dict(grads, w=grads["w"] + 1.0)  # unexplained, but not judged:
    opt = gc.ring(structure="diagonal")
    assert opt.unexplained(grads, opt.init(params), params, stats) == []
    mc = gc.ring(fisher="mc")  # rows of sampled labels, not of the gradient
    assert mc.unexplained(grads, mc.init(params, layers=specs), params, stats) == []
