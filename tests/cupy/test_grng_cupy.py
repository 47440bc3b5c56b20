"""grng_cupy: the in-place optimizer object for CuPy (and NumPy) training stacks.

Each test runs with NumPy arrays and with CuPy arrays (the latter skipped without a GPU): the
adapter must reproduce the core's functional steps exactly, update the user's arrays in place,
reject mixed devices clearly, and save / load portable checkpoints.
"""

from __future__ import annotations

import importlib.util
import os

import grng_cupy
import numpy as np
import pytest

import grng_core as gc
from grng_core.npz_tree import META_KEY
from grng_core.reference import MLP
from tests import cases

SIZES = (5, 7, 3)
B = 8
MLP_ = MLP(SIZES)
LAYERS = [gc.LayerSpec(*MLP_.layer_keys(k)) for k in range(MLP_.n_layers)]

# every row of the table (tests/cases.py) with this suite's hyperparameters, by case id
HP = {
    ("ring", "kfac"): dict(lr=0.1, damping=1e-2, momentum=0.5, curvature_every=2,
                           inverse_every=3),
    ("ring", "diagonal"): dict(lr=0.01, damping=1e-2),
    ("ring", "woodbury"): dict(lr=0.1, damping=1e-2),
    ("reng", "kfac"): dict(lr=0.1, damping=1e-2),
    ("reng", "diagonal"): dict(lr=0.01, damping=1e-2, weight_decay=1e-3),
    ("reng", "woodbury"): dict(lr=0.1, damping=1e-2),
    ("rkalman", "kfac"): dict(lr=0.2, damping=1e-2, inverse_every=3),
    ("rkalman", "diagonal"): dict(lr=0.5),
    ("rkalman", "woodbury"): dict(lr=0.5),
}
CONFIGS = {c.id: c.using(**HP[(c.optimizer, c.structure)]) for c in cases.select()}
RING_KFAC, RKALMAN_KFAC = "ring-kfac", "rkalman-kfac-finite_difference"
RKALMAN_WOODBURY = "rkalman-woodbury-finite_difference"


def host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def batches(xp, n, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((B, SIZES[0]))
        y = np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)]
        out.append((xp.asarray(x, dtype=dtype), xp.asarray(y, dtype=dtype)))
    return out


def make(xp, name, params=None, dtype="float64"):
    case = CONFIGS[name]
    if params is None:
        params = [xp.asarray(p, dtype=dtype) for p in MLP_.init(seed=1)]
    layers = LAYERS if case.structure == "kfac" else None
    return case.cupy(params, layers=layers), params


def adapter_steps(opt, params, data):
    req = opt.requirements
    for x, y in data:
        need = opt.needs_stats()
        b = MLP_.batch(params, x, y, per_example=need and req.per_example_grads,
                       layer_stats=need and req.layer_stats)
        oracle = MLP_.oracle(x, y)
        opt.step(b.grads, stats=gc.Stats(b.per_example_grads, b.layers) if need else None,
                 grad_fn=oracle.grad_fn, hvp_fn=oracle.hvp_fn)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_steps_equal_the_core_and_update_in_place(xp, name):
    data = batches(xp, 6)
    opt, params = make(xp, name)
    ids = [id(p) for p in params]
    before = [host(p).copy() for p in params]
    adapter_steps(opt, params, data)
    assert [id(p) for p in params] == ids  # the user's arrays, updated in place
    assert any(not np.array_equal(host(p), b) for p, b in zip(params, before))
    assert opt.t == 6 and int(host(opt.state.step)) == 6

    core = opt.core
    ref = [xp.asarray(p) for p in MLP_.init(seed=1)]
    state = core.init(ref, layers=LAYERS if core.config.structure == "kfac" else None)
    req = core.requirements
    for step, (x, y) in enumerate(data):
        curvature, inverse = core.flags(step)  # step: the steps already taken
        b = MLP_.batch(ref, x, y, per_example=req.per_example_grads and curvature,
                       layer_stats=req.layer_stats and curvature)
        u, state = core.update(b.grads, state, ref, gc.Stats(b.per_example_grads, b.layers),
                               MLP_.oracle(x, y), curvature=curvature, inverse=inverse)
        ref = gc.apply_updates(ref, u)
    for p, r in zip(params, ref):
        assert np.array_equal(host(p), host(r))


def test_dict_and_tuple_params(xp):
    data = batches(xp, 3)
    base = [xp.asarray(p) for p in MLP_.init(seed=1)]
    as_dict = {f"p{i}": xp.asarray(host(p).copy()) for i, p in enumerate(base)}
    as_tuple = tuple(xp.asarray(host(p).copy()) for p in base)
    opt_d = grng_cupy.RING(as_dict, lr=0.1, damping=1e-2, structure="woodbury")
    opt_t = grng_cupy.RING(as_tuple, lr=0.1, damping=1e-2, structure="woodbury")
    for x, y in data:
        b = MLP_.batch(list(as_tuple), x, y, per_example=True)
        opt_t.step(tuple(b.grads), stats=gc.Stats(per_example_grads=tuple(b.per_example_grads)))
        bd = MLP_.batch(list(as_dict.values()), x, y, per_example=True)
        keys = list(as_dict)
        opt_d.step(dict(zip(keys, bd.grads)),
                   stats=gc.Stats(per_example_grads=dict(zip(keys, bd.per_example_grads))))
    for (k, v), w in zip(as_dict.items(), as_tuple):
        assert np.array_equal(host(v), host(w)), k


def test_float32_params_stay_float32(xp):
    opt, params = make(xp, RING_KFAC, dtype="float32")
    adapter_steps(opt, params, batches(xp, 3, dtype="float32"))
    assert all(p.dtype == xp.float32 for p in params)
    layer = opt.state.curvature.kfac[0]
    assert (layer.layout.weight, layer.layout.bias) == (0, 1)
    assert layer.A.dtype == xp.float32
    assert all(np.all(np.isfinite(host(p))) for p in params)


def test_statistics_only_on_curvature_steps(xp):
    opt, params = make(xp, RING_KFAC)  # curvature_every=2
    (x, y), (x2, y2) = batches(xp, 2)
    assert opt.needs_stats()
    with pytest.raises(ValueError, match=r"needs stats=grng_core.Stats\(layers="):
        opt.step(MLP_.grad(params, x, y))
    assert opt.t == 0 and int(host(opt.state.step)) == 0  # nothing happened
    b = MLP_.batch(params, x, y, layer_stats=True)
    opt.step(b.grads, stats=gc.Stats(layers=b.layers))
    assert not opt.needs_stats() and opt.flags() == (False, False)
    opt.step(MLP_.grad(params, x2, y2))  # step 2: no statistics collected
    assert opt.t == 2


def test_missing_oracle_and_layout_are_clear(xp):
    opt, params = make(xp, "reng-woodbury-double_backprop")
    x, y = batches(xp, 1)[0]
    b = MLP_.batch(params, x, y, per_example=True)
    with pytest.raises(ValueError, match="needs hvp_fn"):
        opt.step(b.grads, stats=gc.Stats(per_example_grads=b.per_example_grads))
    with pytest.raises(ValueError, match="grng_cupy.RING with structure 'kfac' needs the layer "
                                         "layout: layers=.*fallback='diagonal'"):
        grng_cupy.RING([xp.asarray(p) for p in MLP_.init()])  # kfac without layers
    with pytest.raises(ValueError, match="grads has keys"):
        opt.step(b.grads[:-1])


def test_device_mismatch_is_a_clear_type_error(xp):
    opt, params = make(xp, "reng-woodbury-double_backprop")
    x, y = batches(xp, 1)[0]
    b = MLP_.batch(params, x, y, per_example=True)
    if xp is np:
        import array_api_strict as other

        want = r"device mismatch: the parameters are a NumPy array .* grads\[0\] is a " \
               r"array_api_strict"
    else:
        other = np
        want = r"device mismatch: the parameters are a CuPy array on GPU \d+ but grads\[0\] " \
               r"is a NumPy array \(host memory\); move it with cupy.asarray"
    wrong = [other.asarray(host(g)) for g in b.grads]
    with pytest.raises(TypeError, match=want):
        opt.step(wrong, stats=gc.Stats(per_example_grads=b.per_example_grads),
                 hvp_fn=MLP_.oracle(x, y).hvp_fn)
    wrong_pe = [other.asarray(host(g)) for g in b.per_example_grads]
    with pytest.raises(TypeError, match=r"stats.per_example_grads\[0\]"):
        opt.step(b.grads, stats=gc.Stats(per_example_grads=wrong_pe),
                 hvp_fn=MLP_.oracle(x, y).hvp_fn)
    assert opt.t == 0


def test_only_cupy_or_numpy_params(xp):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="takes CuPy arrays .*Use grng_torch"):
        grng_cupy.RING([torch.zeros(3, 2)], structure="diagonal")
    mixed = [xp.zeros((3, 2)), np.zeros(3) if xp is not np else torch.zeros(3)]
    with pytest.raises(TypeError, match="one library on one device"):
        grng_cupy.RING(mixed, structure="diagonal")
    if xp is np:
        ro = np.zeros((3, 2))
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            grng_cupy.RING([ro], structure="diagonal")


@pytest.mark.parametrize("name", [RING_KFAC, RKALMAN_KFAC, "reng-diagonal-finite_difference"])
def test_save_load_resumes_exactly(xp, tmp_path, name):
    data = batches(xp, 10)
    straight, p_straight = make(xp, name)
    adapter_steps(straight, p_straight, data)

    first, params = make(xp, name)
    adapter_steps(first, params, data[:5])
    path = tmp_path / "opt.npz"
    first.save(path)
    resumed, _ = make(xp, name, params=params)  # a new process: same params, fresh optimizer
    resumed.load(path)
    assert resumed.t == 5
    adapter_steps(resumed, params, data[5:])
    for p, q in zip(params, p_straight):
        assert np.array_equal(host(p), host(q))


def test_checkpoint_moves_between_libraries(xp, tmp_path):
    """Saved from xp (cupy or numpy), resumed on NumPy: the same run to 1e-10."""
    data = batches(xp, 8)
    a, pa = make(xp, RKALMAN_KFAC)
    adapter_steps(a, pa, data[:4])
    a.save(tmp_path / "s.npz")
    p_host = [np.array(host(p)) for p in pa]
    b, _ = make(np, RKALMAN_KFAC, params=p_host)
    b.load(tmp_path / "s.npz")
    assert isinstance(b.state.step, np.ndarray | np.generic)
    adapter_steps(a, pa, data[4:])
    adapter_steps(b, p_host, [(np.array(host(x)), np.array(host(y))) for x, y in data[4:]])
    for p, q in zip(pa, p_host):
        p = host(p)
        assert np.linalg.norm(p - q) <= 1e-10 * np.linalg.norm(p)


def test_failed_load_leaves_the_optimizer_untouched(xp, tmp_path):
    opt, params = make(xp, RING_KFAC)
    adapter_steps(opt, params, batches(xp, 3))
    other, _ = make(xp, RKALMAN_KFAC)
    other.save(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"\0" * 64)
    state, t = opt.state, opt.t
    snap = host(opt.state.curvature.kfac[0].A).copy()
    with pytest.raises(ValueError, match="checkpoint is for optimizer 'rkalman'"):
        opt.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="not a .npz archive"):
        opt.load(tmp_path / "junk.npz")
    assert opt.state is state and opt.t == t
    assert np.array_equal(host(opt.state.curvature.kfac[0].A), snap)


def test_state_dict_round_trip(xp):
    opt, params = make(xp, RKALMAN_WOODBURY)
    adapter_steps(opt, params, batches(xp, 3))
    sd = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    fresh, _ = make(xp, RKALMAN_WOODBURY, params=params)
    fresh.load_state_dict(sd)
    assert fresh.t == 3
    belief = opt.state.curvature
    assert isinstance(belief, gc.Belief) and belief.diagonal is not None
    for v, w in zip(belief.diagonal, fresh.state.curvature.diagonal, strict=True):
        assert (v is None) == (w is None)
        if v is not None:
            assert np.array_equal(host(w), host(v))


def test_load_checks_the_hyperparameters(xp, tmp_path):
    opt, params = make(xp, RING_KFAC)
    adapter_steps(opt, params, batches(xp, 2))
    opt.save(tmp_path / "a.npz")
    other = CONFIGS[RING_KFAC].cupy(params, layers=LAYERS, damping=2e-2)
    with pytest.raises(ValueError, match="hyperparameters differ.*damping"):
        other.load(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="hyperparameters differ"):
        other.load_state_dict(opt.state_dict())
    assert other.t == 0
    slower = CONFIGS[RING_KFAC].cupy(params, layers=LAYERS, lr=0.01)
    with pytest.raises(ValueError, match=r"lr: file .*allow_changed=\('lr',\)"):
        slower.load(tmp_path / "a.npz")
    slower.load(tmp_path / "a.npz", allow_changed=("lr",))  # resume at this optimizer's lr
    assert slower.t == opt.t and slower.core.config.lr == 0.01
    mine, saved = slower.state_dict(), opt.state_dict()
    assert mine.keys() == saved.keys()
    for k in set(saved) - {META_KEY}:  # the metadata records each optimizer's own lr
        assert np.array_equal(host(mine[k]), host(saved[k])), k


def test_fallback_resolves_kfac_without_layers(xp):
    params = [xp.asarray(p) for p in MLP_.init(seed=1)]
    opt = grng_cupy.RING(params, lr=0.1, damping=1e-2, fallback="diagonal")
    assert opt.config.structure == "diagonal" and opt.state.curvature.kfac is None
    kept = grng_cupy.RING(params, lr=0.1, damping=1e-2, layers=LAYERS, fallback="woodbury")
    assert kept.config.structure == "kfac" and len(kept.state.curvature.kfac) == 2
    with pytest.raises(ValueError, match="invalid fallback"):
        grng_cupy.RING(params, fallback="kfac")


@pytest.mark.parametrize("name", cases.OPTIMIZERS)
def test_builders_take_every_config_field(name):
    import inspect

    from grng_core.config import CONFIGS as RECORDS

    build = getattr(grng_cupy, cases.CLASS_NAMES[name])
    sig = inspect.signature(build)
    fields = RECORDS[name].names()
    assert list(sig.parameters)[0] == "params"
    assert sorted(list(sig.parameters)[1:-2]) == sorted(fields)
    assert list(sig.parameters)[-2:] == ["layers", "fallback"]
    assert all(sig.parameters[f].default == RECORDS[name].defaults()[f] for f in fields)
    assert all(f in build.__doc__ for f in fields)


def test_digits_example_runs(xp, tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits_cupy.py")
    spec = importlib.util.spec_from_file_location("digits_cupy_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    device = "gpu" if xp is not np else "cpu"
    acc = mod.main(["--device", device, "--epochs", "1", "--max-steps", "4", "--hidden", "16",
                    "--checkpoint", str(tmp_path / "ex.npz")])
    out = capsys.readouterr().out
    assert f"on {xp.__name__}" in out and "test accuracy" in out
    assert 0.0 <= acc <= 1.0 and os.path.exists(tmp_path / "ex.npz")


def test_describe_reports_structures(xp):
    params = [xp.asarray(p) for p in MLP_.init(seed=1)]
    opt, params = make(xp, RING_KFAC, params)
    adapter_steps(opt, params, batches(xp, 2))
    report = opt.describe()
    assert [e.structure for e in report.entries] == ["kfac"] * len(params)
    assert report.kfac_share == 1.0 and report.skipped == 0
    diag = grng_cupy.RING(params, lr=0.1, fallback="diagonal")
    assert {e.structure for e in diag.describe().entries} == {"diagonal"}
    assert diag.describe().kfac_share == 0.0


def test_a_dict_in_another_key_order_is_refused_at_load(xp, tmp_path):
    """The state is kept per leaf position: a dict of the same keys built in another order
    would put each leaf's state on another (same-shape) leaf, silently; refused by name."""
    rng = np.random.default_rng(0)
    p = {"enc": xp.asarray(rng.standard_normal((4, 4))),
         "dec": xp.asarray(rng.standard_normal((4, 4)))}
    opt = grng_cupy.RING(p, structure="diagonal", momentum=0.9)
    opt.step({"enc": xp.ones((4, 4)), "dec": xp.full((4, 4), -5.0)})
    opt.save(tmp_path / "order.npz")
    sd = opt.state_dict()
    same = grng_cupy.RING({"enc": p["enc"], "dec": p["dec"]}, structure="diagonal",
                          momentum=0.9)
    same.load(tmp_path / "order.npz")  # the saved order: fine
    assert np.array_equal(host(same.state.momentum[0]), host(opt.state.momentum[0]))
    other = grng_cupy.RING({"dec": p["dec"], "enc": p["enc"]}, structure="diagonal",
                           momentum=0.9)
    before = other.state
    with pytest.raises(ValueError, match=r"in the order \['enc', 'dec'\].*\['dec', 'enc'\]"):
        other.load(tmp_path / "order.npz")
    with pytest.raises(ValueError, match="in the order"):
        other.load_state_dict(sd)
    assert other.state is before
    with pytest.raises(ValueError, match="the same keys in another order"):
        other.step({"enc": xp.ones((4, 4)), "dec": xp.ones((4, 4))})


def test_describe_lists_the_layers_that_skip_the_warm_up(xp):
    """A layer with warmup_rows·max(d_in + 1, d_out) rows a step or more skips the refresh
    warm-up (`grng_core.schedule.layer_warms`): at 75 rows the 5→7 layer (70) does, the 7→3
    layer (80) does not; describe() says so, as grng_torch's does."""
    params = [xp.asarray(p) for p in MLP_.init(seed=1)]
    opt = grng_cupy.RING(params, layers=LAYERS)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((75, SIZES[0])))
    y = xp.asarray(np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], 75)])
    b = MLP_.batch(params, x, y, layer_stats=True)
    opt.step(b.grads, stats=gc.Stats(layers=b.layers))
    report = opt.describe()
    assert report.no_warmup == (report.entries[LAYERS[0].weight].name,)
    assert "refresh warm-up skipped" in str(report)
    # rows given with a sequence axis (B, T, d) count B·T rows, as the core counts them
    seq = grng_cupy.RING([xp.asarray(p) for p in MLP_.init(seed=1)], layers=LAYERS)
    shaped = [ls._replace(inputs=xp.reshape(ls.inputs, (5, 15, -1)),
                          output_grads=xp.reshape(ls.output_grads, (5, 15, -1)))
              for ls in b.layers]
    seq.step(b.grads, stats=gc.Stats(layers=shaped))
    assert seq.describe().no_warmup == report.no_warmup


def _square_stack(xp, transposed: bool):
    """A hand-written net x @ W0 → tanh → @ W1 of square bias-free (D, D) weights (W stored
    (d_in, d_out)), its K-FAC layers declared `transposed`, one step: the warnings."""
    import warnings

    rng = np.random.default_rng(0)
    D, n = 6, 16
    ps = [xp.asarray(rng.normal(size=(D, D)) / np.sqrt(D)) for _ in range(2)]
    x, y = xp.asarray(rng.normal(size=(n, D))), xp.asarray(rng.normal(size=(n, D)))
    h = xp.tanh(x @ ps[0])
    dz2 = (h @ ps[1] - y) / n
    dz1 = (dz2 @ ps[1].T) * (1 - h * h)
    grads = [x.T @ dz1, h.T @ dz2]
    opt = grng_cupy.RING(ps, layers=[gc.LayerSpec(k, None, transposed=transposed)
                                     for k in range(2)])
    stats = gc.Stats(layers=[gc.LayerStats(k, None, a, s * n, transposed=transposed)
                             for k, (a, s) in enumerate([(x, dz1), (h, dz2)])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(grads, stats=stats)
    return [str(w.message) for w in caught]


def test_a_layer_in_the_other_orientation_is_warned_about(xp):
    """Square bias-free layers pass every shape check in either orientation; declared in the
    wrong one, K-FAC's factors are swapped and the steps silently worse (a reviewer's run:
    final loss 0.128 against 0.093). The first step's gradient check names them."""
    assert _square_stack(xp, transposed=True) == []
    got = _square_stack(xp, transposed=False)
    assert len(got) == 1 and "layer(s) 0, 1 is not the product" in got[0] \
        and "orientation" in got[0], got
