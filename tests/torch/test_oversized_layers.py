"""A layer whose K-FAC factor exceeds `max_factor_dim` (ALGORITHMS.md §2.1) runs on the
diagonal structure: the same steps as putting it in a param group of structure "diagonal"
yourself, named in `describe()` and in one warning, alike with and without a closure."""

import warnings

import grng_torch
import pytest
import torch
from torch import nn

from tests.torch._util import step_on

OPTS = ["RING", "RENG", "RKalman"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 20)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(32, 6, dtype=torch.float64, generator=g),
            torch.randint(0, 20, (32,), generator=g))


def _train(model, opt, steps=25, closure_free=False):
    x, y = _data()
    for _ in range(steps):  # past the warm-up (20) and a scheduled refresh
        step_on(opt, model, x, y, closure_free)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", OPTS)
def test_steps_equal_a_diagonal_param_group_for_the_oversized_head(name):
    cls = getattr(grng_torch, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _model()
        limited = _train(m, cls(m.parameters(), model=m, max_factor_dim=16))
        m = _model()
        grouped = _train(m, cls([{"params": m[0].parameters()},
                                 {"params": m[2].parameters(), "structure": "diagonal"}],
                                model=m))
        m = _model()
        full = _train(m, cls(m.parameters(), model=m))  # 20 <= 8192: the head on K-FAC
    torch.testing.assert_close(limited, grouped, rtol=0, atol=1e-11)
    assert (limited - full).abs().max() > 1e-3  # the limit changed which structure ran


def test_closure_free_steps_match_the_closure_steps():
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = _train(m, grng_torch.RING(m.parameters(), model=m, max_factor_dim=16))
        m = _model()
        b = _train(m, grng_torch.RING(m.parameters(), model=m, max_factor_dim=16),
                   closure_free=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_describe_and_one_warning_name_the_layer_and_the_factor():
    m = _model()
    opt = grng_torch.RING(m.parameters(), model=m, max_factor_dim=16)
    before = {e.name: e for e in opt.describe().entries}
    assert before["2.weight"].structure == "diagonal"
    assert "S 20x20 exceeds max_factor_dim=16" in before["2.weight"].reason
    with pytest.warns(UserWarning, match=r"'2': its K-FAC factor S 20x20 exceeds "
                                         r"max_factor_dim=16") as rec:
        _train(m, opt, steps=2)
    assert sum("whose factors are too large" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        _train(m, opt, steps=2)
    assert not any("too large" in str(w.message) for w in later)  # once per optimizer
    after = {e.name: e for e in opt.describe().entries}
    assert after["2.bias"].structure == "diagonal" and "max_factor_dim" in after["2.bias"].reason
    assert after["0.weight"].structure == "kfac"
    assert [w for w, _ in opt.group_state(0).layers] == [0]  # the state's one K-FAC layer


def test_a_state_dict_round_trip_keeps_the_choice():
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = grng_torch.RING(m.parameters(), model=m, max_factor_dim=16)
        _train(m, opt, steps=3)
        again = grng_torch.RING(m.parameters(), model=m, max_factor_dim=16)
        again.load_state_dict(opt.state_dict())
        a = _train(m, again, steps=2)
    assert torch.isfinite(a).all()
    assert [w for w, _ in again.group_state(0).layers] == [0]


def test_a_file_saved_without_a_limit_loads_under_one_as_it_was_built(tmp_path):
    """opt.load checks hyperparameters as grng_core.load_state does (max_factor_dim cannot
    change a built state's steps): the head saved on K-FAC stays on K-FAC."""
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = grng_torch.RING(m.parameters(), model=m, max_factor_dim=None)
        _train(m, opt, steps=2)
        opt.save(tmp_path / "s.npz")
        low = grng_torch.RING(m.parameters(), model=m, max_factor_dim=16)
        low.load(tmp_path / "s.npz")
        _train(m, low, steps=2)
    assert [w for w, _ in low.group_state(0).layers] == [0, 2]
