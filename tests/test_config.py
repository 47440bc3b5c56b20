"""Hyperparameter validation (grng_core/config.py): every invalid value raises ValueError at
construction, and the message names the parameter, the value and the allowed range."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import grng_core as gc
from tests import cases

BUILDERS = {name: getattr(gc, name) for name in cases.OPTIMIZERS}
ALL = cases.optimizers()
WITH_GR = cases.optimizers(with_estimator=True)

# (parameter, invalid value, text of the allowed range, builders it applies to)
INVALID = [
    ("lr", -0.1, "[0.0, inf)", ALL),
    ("lr", math.nan, "finite real number", ALL),
    ("lr", math.inf, "finite real number", ALL),
    ("lr", "0.1", "finite real number", ALL),
    ("lr", True, "finite real number", ALL),
    ("lr", None, "finite real number", ALL),
    ("rho", -1e-3, "[0.0, inf)", ALL),
    ("rho", math.nan, "finite real number", ALL),
    ("damping", 0.0, "(0.0, inf)", ALL),
    ("damping", -1e-3, "(0.0, inf)", ALL),
    ("damping", math.inf, "finite real number", ALL),
    ("momentum", -0.1, "[0.0, 1.0)", ALL),
    ("momentum", 1.0, "[0.0, 1.0)", ALL),
    ("weight_decay", -1e-4, "[0.0, inf)", ALL),
    ("ema_decay", 1.0, "[0.0, 1.0)", ALL),
    ("ema_decay", -0.01, "[0.0, 1.0)", ALL),
    ("ema_decay", 1.5, "[0.0, 1.0)", ALL),
    ("curvature_every", 0, "integer >= 1", ALL),
    ("curvature_every", 2.0, "integer >= 1", ALL),
    ("curvature_every", True, "integer >= 1", ALL),
    ("inverse_every", -3, "integer >= 1", ALL),
    ("ns_tol", 0.0, "(0.0, 1.0)", ALL),
    ("ns_tol", 1.0, "(0.0, 1.0)", ALL),
    ("ns_max_iter", 0, "integer >= 1", ALL),
    ("inverse_method", "lu", "'newton_schulz', 'cholesky'", ALL),
    ("kl_clip", 0.0, "(0.0, inf)", ALL),
    ("kl_clip", -1.0, "(0.0, inf)", ALL),
    ("state_dtype", "float16", "None, 'float32', 'float64'", ALL),
    ("on_nonfinite", "ignore", "'skip', 'raise'", ALL),
    ("structure", "full", "'kfac', 'diagonal', 'woodbury'", ALL),
    ("structure", "KFAC", "'kfac', 'diagonal', 'woodbury'", ALL),
    ("fisher", "true", "'empirical', 'mc'", ALL),
    ("gr", "hvp", "'double_backprop', 'finite_difference'", WITH_GR),
    ("fd_scheme", "sideways", "'forward', 'backward', 'central'", WITH_GR),
    ("fd_radius", 0.0, "(0.0, inf)", WITH_GR),
    ("fd_radius", -1e-3, "(0.0, inf)", WITH_GR),
    ("kalman_decay", 1.0, "[0.0, 1.0)", ("rkalman",)),
    ("kalman_decay", -0.5, "[0.0, 1.0)", ("rkalman",)),
    ("prior_var", 0.0, "(0.0, inf)", ("rkalman",)),
    ("prior_var", -1.0, "(0.0, inf)", ("rkalman",)),
]


def _cases():
    for name, value, allowed, builders in INVALID:
        for b in builders:
            yield pytest.param(b, name, value, allowed, id=f"{b}-{name}={value!r}")


@pytest.mark.parametrize("builder,name,value,allowed", list(_cases()))
def test_invalid_hyperparameter_raises_naming_it(builder, name, value, allowed):
    with pytest.raises(ValueError) as info:
        BUILDERS[builder](**{name: value})
    msg = str(info.value)
    assert f"{name}={value!r}" in msg, msg  # the parameter and its value
    assert allowed in msg, msg  # the allowed range


@pytest.mark.parametrize("rho,damping", [(2.0, 1.0), (1001.0, 1e-3), (1.0, 1.5)])
def test_ring_rejects_rho_times_damping_above_one(rho, damping):
    with pytest.raises(ValueError) as info:
        gc.ring(rho=rho, damping=damping, form="gauss_newton")
    msg = str(info.value)
    assert "rho*damping" in msg and f"rho={rho!r}" in msg and f"damping={damping!r}" in msg
    assert "0 <= rho*damping <= 1" in msg


def test_adaptive_damping_has_no_rho_damping_bound():
    assert gc.ring(rho=2.0, damping=1.0).config.form == "adaptive_damping"
    with pytest.raises(ValueError, match="form"):
        gc.ring(form="newton")


def test_ring_accepts_rho_times_damping_at_one():
    assert gc.ring(rho=1000.0, damping=1e-3).name == "ring"
    assert gc.ring(rho=0.0, damping=1.0).name == "ring"


@pytest.mark.parametrize("ema_decay", [0.5, 0.3, 0.0])
def test_rkalman_kfac_needs_ema_decay_above_one_half(ema_decay):
    with pytest.raises(ValueError) as info:
        gc.rkalman(structure="kfac", ema_decay=ema_decay)
    msg = str(info.value)
    assert f"ema_decay={ema_decay!r}" in msg and "(0.5, 1)" in msg
    gc.rkalman(structure="woodbury", ema_decay=ema_decay)  # only the kfac belief needs it


@pytest.mark.parametrize("builder", ALL)
def test_unknown_keyword_is_a_type_error(builder):
    with pytest.raises(TypeError):
        BUILDERS[builder](learning_rate=0.1)


def test_ring_takes_no_estimator():
    with pytest.raises(TypeError):
        gc.ring(gr="double_backprop")


@pytest.mark.parametrize("builder", ALL)
def test_valid_edges_are_accepted(builder):
    kw = dict(lr=0.0, rho=0.0, damping=1e-12, momentum=0.0, weight_decay=0.0, ema_decay=0.0,
              ns_tol=0.5, ns_max_iter=1, curvature_every=1, inverse_every=1, kl_clip=1e-9,
              state_dtype="float64", on_nonfinite="raise", structure="diagonal")
    if builder == "rkalman":
        kw.update(kalman_decay=0.0, prior_var=1e-12)
    opt = BUILDERS[builder](**kw)
    assert opt.config.damping == 1e-12


@pytest.mark.parametrize("builder", ALL)
def test_hyperparams_are_reported(builder):
    opt = BUILDERS[builder](lr=0.25, structure="woodbury", on_nonfinite="raise")
    assert opt.config.lr == 0.25
    assert opt.config.on_nonfinite == "raise"
    assert opt.config.structure == "woodbury"


@pytest.mark.parametrize("name", ["lr", "rho", "damping"])
def test_schedule_checked_at_first_step(name):
    with pytest.raises(ValueError, match=name):
        gc.reng(**{name: lambda t: -1.0})


@pytest.mark.parametrize("kw", [dict(lr=np.float32(0.1)), dict(damping=np.float32(1e-3)),
                                dict(curvature_every=np.int64(2))],
                         ids=["lr-float32", "damping-float32", "curvature_every-int64"])
def test_numpy_scalars_are_numbers(kw):
    gc.reng(**kw)


def test_refresh_defaults_every_10_after_a_warm_up_of_the_ema_horizon():
    """§2.1 / README "Defaults": statistics and inverses every 10 steps, every step during
    the first ⌈1/(1 − β)⌉ (20 at β = 0.95); `refresh_warmup` sets it, 0 turns it off; the
    flags of a step-count array are the same as of the ints."""
    from grng_core.schedule import flag_table, warmup_steps

    opt = gc.ring()
    assert (opt.config.curvature_every, opt.config.inverse_every) == (10, 10)
    assert warmup_steps(opt.config) == 20
    assert all(opt.flags(t) == (True, True) for t in range(20))
    assert [t for t in range(20, 60) if any(opt.flags(t))] == [20, 30, 40, 50]
    steps = np.arange(60)
    cur, inv = opt.flags(steps)
    np.testing.assert_array_equal(cur, [opt.flags(int(t))[0] for t in steps])
    np.testing.assert_array_equal(inv, [opt.flags(int(t))[1] for t in steps])
    assert warmup_steps(gc.ring(ema_decay=0.9).config) == 10
    off = gc.ring(refresh_warmup=0)
    assert off.flags(1) == (False, False) and off.flags(10) == (True, True)
    assert gc.ring(refresh_warmup=3).flags(2) == (True, True)
    # the periodic table describes the steps after the warm-up
    pairs, index = flag_table(opt.config)
    assert [pairs[index[t % len(index)]] for t in range(20, 40)] == \
        [opt.flags(t) for t in range(20, 40)]
    # R-Kalman: its belief's predict follows the curvature flag; no inverse unless asked
    rk = gc.rkalman()
    assert rk.flags(5) == (True, False) and rk.flags(25) == (False, False)
    with pytest.raises(ValueError, match="refresh_warmup"):
        gc.ring(refresh_warmup=-1)


def test_a_weight_decay_that_shrinks_weights_fast_warns_once(monkeypatch):
    """§3 tail's decay is lr·weight_decay a step, outside the trust region: AdamW's 0.1 at
    R-Kalman's lr 1.0 is 10% of every weight a step (a reviewer's tiny Llama: ‖θ‖ 13 → 1.5 in 40
    steps). Warned once per process, with the weight_decay that gives AdamW's 1e-4 a step."""
    from grng_core import config as cfg
    monkeypatch.setattr(cfg, "_decay_warned", [])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gc.ring(weight_decay=0.01)  # 1e-3 a step: at the line, quiet
        gc.ring(lr=lambda t: 0.1, weight_decay=1.0)  # a schedule: not judged
        gc.reng(weight_decay=0.0)
    assert not [w for w in rec if "weight_decay" in str(w.message)]
    with pytest.warns(UserWarning, match=r"weight_decay=0\.1 at lr=1 shrinks every weight by "
                                         r"10\.0% a step.*weight_decay=0\.0001"):
        gc.rkalman(weight_decay=0.1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gc.ring(weight_decay=0.1)
    assert not [w for w in rec if "weight_decay" in str(w.message)]  # once
