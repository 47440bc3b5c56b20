"""grng_core.fused: the one-pass torch kernels give the array-API expressions' values (to
rounding) on every backend, with Python-number and 0-d-array scalars, and leave their inputs
unchanged (ALGORITHMS.md §2.1 EMA and damping shift; §3.2, §3 combinations)."""

import numpy as np
import pytest

from grng_core import fused


def _arrays(backend, dtype="float64"):
    rs = np.random.default_rng(3)
    x, y = rs.normal(size=(7, 5)), rs.normal(size=(7, 5))
    M = rs.normal(size=(6, 6))
    return x, y, M, [backend.asarray(v, dtype) for v in (x, y, M)]


@pytest.mark.parametrize("scalar", ["number", "array"])
def test_ema_axpby_and_diagonal_shift_equal_the_expressions(backend, scalar):
    x, y, M, (bx, by, bM) = _arrays(backend)
    wrap = (lambda v: v) if scalar == "number" else (lambda v: backend.asarray(v))
    beta, a, b, shift = 0.95, -0.3, 1.7, 0.25
    got = {"ema": fused.ema(bx, by, wrap(beta), backend.xp),
           "axpby": fused.axpby(wrap(a), bx, wrap(b), by, backend.xp),
           "diag": fused.add_to_diagonal(bM, wrap(shift), backend.xp)}
    want = {"ema": beta * x + (1 - beta) * y, "axpby": a * x + b * y,
            "diag": M + shift * np.eye(6)}
    for k, w in want.items():
        np.testing.assert_allclose(backend.to_numpy(got[k]), w, rtol=1e-14, atol=1e-15,
                                   err_msg=k)
    # inputs untouched (the torch kernels write only into fresh results)
    for orig, arr in ((x, bx), (y, by), (M, bM)):
        np.testing.assert_array_equal(backend.to_numpy(arr), orig)


def test_float32_leaves_keep_their_dtype_with_float64_scalars(backend):
    if backend.name != "torch":
        pytest.skip("the dtype handling of 0-d scalars is torch's branch")
    import torch

    _, _, _, (bx, by, bM) = _arrays(backend, "float32")
    s = torch.tensor(0.5, dtype=torch.float64)
    assert fused.ema(bx, by, s, backend.xp).dtype == torch.float32
    assert fused.axpby(s, bx, s, by, backend.xp).dtype == torch.float32
    assert fused.add_to_diagonal(bM, s, backend.xp).dtype == torch.float32
