"""An embedding's K-FAC layer (ALGORITHMS.md §2.1 "Embeddings"): one-hot inputs make
A = diag(token frequencies), kept as a vector with an elementwise damped inverse. Reference:
the same layer registered as a dense K-FAC layer fed the explicit one-hot rows (its Â is that
diagonal as a matrix), in float64, for every optimizer and RING form; and the token-frequency
statistic against numpy.bincount."""

from __future__ import annotations

import numpy as np
import pytest

import grng_core as gc
from grng_core.structures.rows import frequencies
from tests.backends import get_backend

VOCAB, DIM, N, B = 9, 4, 24, 6  # 24 tokens from 6 examples (T = 4)
BE = get_backend("numpy")

OPTIMIZERS = {
    "ring-adaptive": lambda: gc.ring(lr=0.5, damping=0.1, inverse_every=2),
    "ring-gn": lambda: gc.ring(lr=0.5, damping=0.1, form="gauss_newton"),
    "reng": lambda: gc.reng(lr=0.5, damping=0.1, gr="finite_difference"),
    "rkalman": lambda: gc.rkalman(lr=0.5, damping=0.1, kalman_refresh_every=1),
}


def _batch(rs):
    ids = rs.integers(0, VOCAB - 2, size=N)  # the last two tokens never occur
    s = rs.normal(size=(N, DIM))
    onehot = np.eye(VOCAB)[ids]
    G = s.T @ onehot / B  # (DIM, VOCAB): the gradient of the (VOCAB, DIM) weight, transposed
    return ids, s, onehot, G.T.copy()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_embedding_layer_equals_the_dense_one_hot_layer(name):
    rs = np.random.default_rng(0)
    E = rs.normal(size=(VOCAB, DIM))
    runs = []
    for diagonal in (True, False):
        opt = OPTIMIZERS[name]()
        params = [BE.asarray(E)]
        spec = gc.LayerSpec(0, None, transposed=True, a_diagonal=diagonal)
        state = opt.init(params, layers=[spec])
        rs_steps = np.random.default_rng(1)
        for _ in range(3):
            ids, s, onehot, grad = _batch(rs_steps)
            inputs = ids if diagonal else onehot
            stats = gc.Stats(layers=[gc.LayerStats(0, None, BE.asarray(inputs), BE.asarray(s),
                                                   True, batch_size=B)])
            # RENG's finite differences: the gradient of a quadratic with Hessian 0.1·I
            oracle = gc.Oracle(grad_fn=lambda p, g=grad, at=params[0]: [g + 0.1 * (p[0] - at)])
            updates, state = opt.update([BE.asarray(grad)], state, params, stats=stats,
                                        oracle=oracle if name in ("reng", "rkalman") else None)
            params = gc.apply_updates(params, updates)
        runs.append((np.asarray(params[0]), state.curvature.kfac[0]))
    (E_diag, layer), (E_dense, dense_layer) = runs
    assert np.abs(E_dense - E).max() > 1e-2  # the steps moved the weights
    np.testing.assert_allclose(E_diag, E_dense, rtol=1e-9, atol=1e-12)
    assert np.asarray(layer.A).shape == (VOCAB,)
    np.testing.assert_allclose(np.diag(np.asarray(dense_layer.A)), np.asarray(layer.A),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(E_diag[-2:], E[-2:], rtol=1e-6)  # unseen tokens: g = 0


def test_frequencies_are_bincount_over_n():
    rs = np.random.default_rng(3)
    ids = rs.integers(0, 50, size=200)
    got = frequencies(BE.asarray(ids), 53, BE.xp, np.float64, None)
    np.testing.assert_allclose(np.asarray(got), np.bincount(ids, minlength=53) / 200)


def test_embedding_checkpoint_key_and_checks(tmp_path):
    opt = gc.ring(lr=0.1)
    params = [BE.asarray(np.zeros((VOCAB, DIM)))]
    state = opt.init(params, layers=[gc.LayerSpec(0, None, True, a_diagonal=True)])
    assert list(gc.codec.encode(state)["kfac"]) == ["0/-/TD"]
    gc.save_state(tmp_path / "e.npz", state, opt=opt)
    back = gc.load_state(tmp_path / "e.npz", like=state, opt=opt)
    assert back.curvature.kfac[0].layout.a_diagonal
    with pytest.raises(ValueError, match="no bias"):
        opt.init([params[0], BE.asarray(np.zeros(DIM))],
                 layers=[gc.LayerSpec(0, 1, True, a_diagonal=True)])


def test_token_frequencies_keep_or_widen_the_id_dtype():
    """Â's diagonal from ids of any integer dtype: int32 ids are used as they are (JAX without
    x64 has no int64 to cast to), uint8 ids of a 300-token table are widened first."""
    for ids, d in [(np.array([0, 2, 2, 5], dtype=np.int32), 6),
                   (np.array([0, 2, 2, 255], dtype=np.uint8), 300)]:
        f = frequencies(ids, d, np, np.float64, None)
        want = np.bincount(ids.astype(np.int64), minlength=d) / ids.shape[0]
        np.testing.assert_array_equal(f, want)
