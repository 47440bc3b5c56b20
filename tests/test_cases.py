"""The test suites' one table of optimizer configurations (tests/cases.py): it is the
consistency suite's table (grng_core.consistency.cases), its labels round-trip, its filters
select what they say, and one case builds the same optimizer in the core and every adapter."""

from __future__ import annotations

import pytest

from grng_core.consistency import default_configs
from tests import cases


def test_table_is_the_consistency_table():
    assert [c.config for c in cases.TABLE] == default_configs()
    assert [c.label for c in cases.TABLE] == [c.label for c in default_configs()]
    for case, config in zip(cases.TABLE, default_configs()):
        assert case.build().config == config.build().config


def test_every_optimizer_structure_and_estimator_once():
    rows = {(c.optimizer, c.structure, c.estimator) for c in cases.TABLE}
    assert len(rows) == 15 and len(cases.TABLE) == 18  # RING: both forms (§3.2)
    assert len(cases.select(optimizer="ring")) == 6
    assert len(cases.select(optimizer=("reng", "rkalman"))) == 12
    assert len(cases.select(estimator=None)) == 6
    assert len(cases.select(estimator="finite_difference", structure="kfac")) == 2
    assert sorted(cases.pairs()) == sorted(
        (o, s) for o in cases.OPTIMIZERS for s in cases.STRUCTURES)
    assert [c.label for c in cases.defaults()] == ["ring/kfac/adaptive", "reng/kfac/double_bp",
                                                   "rkalman/kfac/fin_diff"]
    assert cases.optimizers(with_estimator=True) == ("reng", "rkalman")
    assert [c.label for c in cases.quick()] == list(cases.QUICK)


def test_labels_and_variants_round_trip():
    wide = cases.variants(cases.select(), fd_scheme=cases.FD_SCHEMES, fisher=cases.FISHERS)
    assert len(wide) == 2 * (6 + 6 + 6 * 3)  # each Fisher; fin_diff rows x 3 schemes
    for case in wide:
        assert cases.get(case.label) == case
    case = cases.get("rkalman/kfac/fin_diff:central+mc")
    assert (case.fd_scheme, case.fisher) == ("central", "mc")
    assert case.id == "rkalman-kfac-finite_difference-central-mc"
    with pytest.raises(KeyError, match="no row"):
        cases.get("ring/kfac/double_bp")


def test_builders_take_the_case_and_the_overrides():
    case = cases.get("reng/woodbury/fin_diff:backward+mc").using(lr=0.3, momentum=0.5)
    h = case.build(damping=0.2, prior_var=3.0, kalman_decay=0.5).config  # R-Kalman's dropped
    assert (h.structure, h.gr, h.fd_scheme, h.fisher) == ("woodbury", "finite_difference",
                                                         "backward", "mc")
    assert (h.lr, h.momentum, h.damping) == (0.3, 0.5, 0.2)
    ring = cases.get("ring/diagonal/-", bare=True)
    assert ring.build(gr="double_backprop", fd_radius=1e-2).config == ring.build().config
    with pytest.raises(TypeError):
        ring.build(learning_rate=0.1)  # a keyword no optimizer takes is not dropped
    with pytest.raises(ValueError, match="row"):
        ring.using(structure="kfac")


@pytest.mark.parametrize("case", cases.TABLE, ids=cases.ids(cases.TABLE))
def test_adapters_build_the_cores_optimizer(case):
    """grng_torch and grng_jax, built from one case, hold the core optimizer the case builds."""
    want = case.build().config
    torch = pytest.importorskip("torch")
    try:
        import grng_torch  # noqa: F401
    except ImportError:
        pytest.skip("grng_torch does not import")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = case.torch(model.parameters(), model=model, loss_fn=torch.nn.CrossEntropyLoss())
    assert opt.core(0).config == want
    pytest.importorskip("optax")
    pytest.importorskip("grng_jax")
    assert case.jax().init.grng_core.config == want
