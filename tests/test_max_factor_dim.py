"""`max_factor_dim` (ALGORITHMS.md §2.1): a layer with a K-FAC factor larger than the limit is
not a K-FAC layer. The core names why per layer (`Optimizer.too_large`) and refuses such a layer
listed by a user (`check_sizes`, grng_cupy); the hyperparameter never makes two checkpoints
differ (the state's layers record what it chose)."""

import grng_cupy
import numpy as np
import pytest

import grng_core as gc
from grng_core import checkpoint
from grng_core.config import RINGConfig, unused, upgrade_saved


def _params():
    return {"emb": np.zeros((50, 4)), "hid": np.zeros((6, 5)), "hid_b": np.zeros(6),
            "head": np.zeros((9, 6)), "head_b": np.zeros(9)}


SPECS = [gc.LayerSpec("emb", None, transposed=True, a_diagonal=True), gc.LayerSpec("hid", "hid_b"),
         gc.LayerSpec("head", "head_b")]


def test_default_limit_and_none():
    assert RINGConfig().max_factor_dim == 8192
    assert RINGConfig(max_factor_dim=None).max_factor_dim is None
    with pytest.raises(ValueError, match="max_factor_dim"):
        RINGConfig(max_factor_dim=0)


@pytest.mark.parametrize("limit,expected", [
    (None, [None, None, None]),
    (9, [None, None, None]),  # the head's S is 9x9, the hidden A 5 + bias = 6: at the limit
    (8, [None, None, "S 9x9"]),
    (5, [None, "A 6x6 and S 6x6", "A 7x7 and S 9x9"]),  # the bias column counts in A
    (3, ["S 4x4", "A 6x6 and S 6x6", "A 7x7 and S 9x9"]),  # an embedding's A is diagonal
])
def test_too_large_names_each_factor_over_the_limit(limit, expected):
    opt = gc.ring(max_factor_dim=limit)
    why = opt.too_large(_params(), SPECS)
    for w, e in zip(why, expected):
        if e is None:
            assert w is None
        else:
            assert f"factor {e} exceeds max_factor_dim={limit}" in w


def test_other_structures_have_no_kfac_layers_to_drop():
    assert gc.ring(structure="diagonal", max_factor_dim=1).too_large(_params(), SPECS) == \
        [None] * 3


def test_an_explicit_layer_over_the_limit_is_refused_naming_it_and_the_fix():
    with pytest.raises(ValueError, match=r"K-FAC layer 'head'.*S 9x9 exceeds max_factor_dim=8"
                                         r".*raise max_factor_dim.*leave it out"):
        gc.ring(max_factor_dim=8).check_sizes(_params(), SPECS)
    gc.ring(max_factor_dim=8).check_sizes(_params(), SPECS[:2])  # without it: fine
    with pytest.raises(ValueError, match="exceeds max_factor_dim"):
        grng_cupy.RING({k: v.copy() for k, v in _params().items()}, layers=SPECS,
                       max_factor_dim=8)


def test_a_checkpoint_never_differs_by_it():
    assert "max_factor_dim" in unused("ring", {"structure": "kfac"})
    assert upgrade_saved("ring", {})["max_factor_dim"] is None  # no limit before it existed
    now = checkpoint.hyperparams_json(gc.ring())
    before = {k: v for k, v in now.items() if k != "max_factor_dim"}  # a file from before it
    assert checkpoint.hyperparams_diff("ring", before, now) == []
    assert checkpoint.hyperparams_diff("ring", dict(now, max_factor_dim=None), now) == []
    assert checkpoint.hyperparams_diff("ring", dict(now, lr=0.5), now) == [
        "lr: file 0.5, optimizer 0.1"]


def test_a_state_saved_without_a_limit_loads_under_a_lower_one(tmp_path):
    """The limit applies where layers are chosen, not to a state built before: the file's
    9-wide head loads into an optimizer whose limit is 8, with its layers as saved."""
    params = _params()
    old = gc.ring(max_factor_dim=None)
    state = old.init(params, layers=SPECS)
    path = tmp_path / "s.npz"
    gc.save_state(path, state, opt=old)
    low = gc.ring(max_factor_dim=8)
    loaded = gc.load_state(path, low.init(params, layers=SPECS), opt=low)
    assert [L.layout for L in loaded.curvature.kfac] == [L.layout for L in state.curvature.kfac]
