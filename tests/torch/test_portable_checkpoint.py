"""Portable checkpoints of the torch optimizers (`opt.save` / `opt.load`, grng_core's .npz).

In float64, on an nn.Sequential MLP laid out as grng_core.reference.MLP (weights (out, in),
tanh, softmax cross-entropy on one-hot targets), with the same weights and batches:

- torch 10 steps -> opt.save -> grng_core.load_state into NumPy (and JAX) -> core 10 steps
  == torch 20 steps;
- core 10 steps (NumPy) -> grng_core.save_state -> torch opt.load -> torch 10 steps
  == core 20 steps;

to a relative 1e-10, for RING / RENG / R-Kalman with K-FAC, diagonal and Woodbury
structures (momentum on). Mismatched (layer sizes, optimizer, hyperparameters, K-FAC layout),
corrupted and pickle-holding files raise ValueError and leave the torch optimizer untouched.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile

import grng_torch as gt
import numpy as np
import pytest
import torch
from torch import nn

import grng_core as gc
from grng_core import checkpoint, npz_io
from grng_core.reference import MLP
from tests import cases
from tests.torch._util import closure_for

SIZES = (5, 7, 6, 3)
B = 9
N1, N2 = 10, 10
# torch's BLAS and XLA's round differently, and 20 steps with eigendecompositions amplify it:
# 1.1e-10 was measured for RING's momentum on an AMD EPYC (below 1e-10 on an Intel Xeon)
RTOL = 1e-9
MLP_ = MLP(SIZES, activation="tanh", loss="softmax_ce")
LAYERS = [gc.LayerSpec(*MLP_.layer_keys(k)) for k in range(MLP_.n_layers)]
HAS_JAX = importlib.util.find_spec("jax") is not None

# every optimizer x structure of the table (tests/cases.py) with this suite's hyperparameters
# (momentum on): name -> (optimizer, builder keywords)
ROWS = {
    "ring-kfac": ("ring/kfac/-", dict(lr=0.2, rho=0.05, damping=1e-2, momentum=0.5,
                                      weight_decay=0.01, curvature_every=2, inverse_every=3)),
    "ring-diagonal": ("ring/diagonal/-", dict(lr=0.2, rho=0.05, damping=0.3, momentum=0.5)),
    "ring-woodbury": ("ring/woodbury/-", dict(lr=0.2, rho=0.05, damping=1e-1, momentum=0.5)),
    "reng-kfac-db": ("reng/kfac/double_bp", dict(lr=0.2, rho=0.05, damping=1e-2, momentum=0.5,
                                                 weight_decay=0.01)),
    "reng-diagonal-fd": ("reng/diagonal/fin_diff", dict(lr=0.2, rho=0.05, damping=0.3,
                                                        momentum=0.5)),
    "reng-woodbury-db": ("reng/woodbury/double_bp", dict(lr=0.2, rho=0.05, damping=1e-1,
                                                         momentum=0.5)),
    "rkalman-kfac": ("rkalman/kfac/double_bp", dict(lr=0.3, rho=0.05, damping=1e-2,
                                                    prior_var=0.5, momentum=0.5)),
    "rkalman-diagonal": ("rkalman/diagonal/fin_diff", dict(lr=0.3, rho=0.05, damping=0.3,
                                                           prior_var=0.5, momentum=0.5)),
    "rkalman-woodbury": ("rkalman/woodbury/double_bp", dict(lr=0.3, rho=0.05, prior_var=0.5,
                                                            momentum=0.5)),
}
CASES = {name: (cases.get(label).optimizer, cases.get(label).using(**hp).options())
         for name, (label, hp) in ROWS.items()}
FACTORY = {name: getattr(gc, name) for name in cases.OPTIMIZERS}
CLASS = {name: getattr(gt, cases.CLASS_NAMES[name]) for name in cases.OPTIMIZERS}


def _batches(n=N1 + N2, seed=7):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((B, SIZES[0])),
             np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)]) for _ in range(n)]


BATCHES = _batches()


# ----------------------------------------------------------------- the two sides
def _model(params):
    layers = []
    for k, (d_in, d_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if k < len(SIZES) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params, strict=True):
            p.copy_(torch.as_tensor(np.asarray(v)))
    return model


LOSS = nn.CrossEntropyLoss()  # probability targets: -Σ y log softmax(z), as the reference's


def _torch_opt(algo, hp, model, **kw):
    return CLASS[algo](model.parameters(), model=model, loss_fn=LOSS, **hp, **kw)


def _torch_steps(opt, model, batches):
    for x, y in batches:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def closure(xt=xt, yt=yt):
            opt.zero_grad()
            value = LOSS(model(xt), yt)
            value.backward()
            return value

        opt.step(closure)


def _torch_params(model):
    return [p.detach().numpy().copy() for p in model.parameters()]


def _layers(core):
    return LAYERS if core.config.structure == "kfac" else None


def _core_steps(core, params, state, batches, t0, asarray=np.asarray, n_layers=None):
    """The core on the reference MLP; t0 = steps already taken (host refresh flags);
    n_layers: the K-FAC statistics of the first n_layers layers only."""
    req = core.requirements
    for t, (x, y) in enumerate(batches, start=t0 + 1):
        x, y = asarray(x), asarray(y)
        curvature, inverse = core.flags(t - 1)
        b = MLP_.batch(params, x, y, per_example=req.per_example_grads,
                       layer_stats=req.layer_stats and curvature)
        layers = b.layers if b.layers is None or n_layers is None else b.layers[:n_layers]
        stats = gc.Stats(per_example_grads=b.per_example_grads, layers=layers)
        updates, state = core.update(b.grads, state, params, stats, MLP_.oracle(x, y),
                                     curvature=curvature, inverse=inverse)
        params = gc.apply_updates(params, updates)
    return params, state


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def _flat_state(state):
    return {k: v for k, v in checkpoint.state_to_numpy(state).items() if k != checkpoint.META_KEY}


def _assert_close(got_params, want_params, got_state, want_state):
    for k, (g, w) in enumerate(zip(got_params, want_params, strict=True)):
        assert _rel(g, w) <= RTOL, f"param {k}: relative error {_rel(g, w):.2e}"
    got, want = _flat_state(got_state), _flat_state(want_state)
    assert got.keys() == want.keys()
    for k in want:
        assert _rel(got[k], want[k]) <= RTOL, f"state {k}: relative error {_rel(got[k], want[k])}"


def _grng(opt, i=0):
    return opt.state[opt.param_groups[i]["params"][0]]["grng"]


# ----------------------------------------------------------------- torch -> core
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_save_core_continues(tmp_path, case):
    algo, hp = CASES[case]
    params0 = MLP_.init(seed=3)

    model20 = _model(params0)
    opt20 = _torch_opt(algo, hp, model20)
    _torch_steps(opt20, model20, BATCHES)

    model = _model(params0)
    opt = _torch_opt(algo, hp, model)
    _torch_steps(opt, model, BATCHES[:N1])
    path = tmp_path / "torch.npz"
    opt.save(path)

    meta = gc.read_metadata(path)
    assert meta["optimizer"] == algo and meta["library"] == "torch"
    assert meta["extra"]["adapter"] == "grng_torch" and meta["extra"]["layout"] == "single"
    assert meta["extra"]["groups"][0]["host_step"] == N1

    core = FACTORY[algo](**hp)  # a fresh core with the same hyperparameters
    params = _torch_params(model)
    state = gc.load_state(path, like=core.init(params, layers=_layers(core)), opt=core)
    assert isinstance(state.step, np.ndarray) and int(state.step) == N1
    p_cont, s_cont = _core_steps(core, params, state, BATCHES[N1:], N1)
    _assert_close(p_cont, _torch_params(model20), s_cont, _grng(opt20).core)


@pytest.mark.skipif(not HAS_JAX, reason="needs jax")
@pytest.mark.parametrize("case", ["ring-kfac", "reng-kfac-db", "rkalman-diagonal"])
def test_torch_save_core_on_jax_continues(tmp_path, case):
    """The same file continued by the core on JAX arrays (grng_jax's optax state wraps the core
    state, with its own parameter/layer layout; the core level is the common ground)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    algo, hp = CASES[case]
    params0 = MLP_.init(seed=3)
    model20 = _model(params0)
    opt20 = _torch_opt(algo, hp, model20)
    _torch_steps(opt20, model20, BATCHES)

    model = _model(params0)
    opt = _torch_opt(algo, hp, model)
    _torch_steps(opt, model, BATCHES[:N1])
    path = tmp_path / "torch.npz"
    opt.save(path)

    core = FACTORY[algo](**hp)
    params = [jnp.asarray(p) for p in _torch_params(model)]
    state = gc.load_state(path, like=core.init(params, layers=_layers(core)), opt=core)
    assert isinstance(state.step, jax.Array) and int(state.step) == N1
    p_cont, s_cont = _core_steps(core, params, state, BATCHES[N1:], N1, asarray=jnp.asarray)
    _assert_close([np.asarray(p) for p in p_cont], _torch_params(model20), s_cont,
                  _grng(opt20).core)


# ----------------------------------------------------------------- core -> torch
@pytest.mark.parametrize("case", sorted(CASES))
def test_core_save_torch_continues(tmp_path, case):
    algo, hp = CASES[case]
    core = FACTORY[algo](**hp)
    params0 = MLP_.init(seed=3)
    p20, s20 = _core_steps(core, params0, core.init(params0, layers=_layers(core)), BATCHES, 0)

    p10, s10 = _core_steps(core, params0, core.init(params0, layers=_layers(core)),
                           BATCHES[:N1], 0)
    path = tmp_path / "core.npz"
    gc.save_state(path, s10, opt=core)

    model = _model(p10)
    opt = _torch_opt(algo, hp, model)  # fresh: no step taken, K-FAC layers come from the file
    opt.load(path)
    entry = _grng(opt)
    assert entry.host_step == N1
    assert isinstance(entry.core.step, torch.Tensor)
    if hp["structure"] == "kfac":
        assert entry.layers == [[0, 1], [2, 3], [4, 5]]
    _torch_steps(opt, model, BATCHES[N1:])
    assert _grng(opt).host_step == N1 + N2
    _assert_close(_torch_params(model), p20, _grng(opt).core, s20)


def test_core_state_with_skipped_steps_sets_host_counter(tmp_path):
    """t = step + skipped: a state that skipped a non-finite step resumes at the right t."""
    algo, hp = CASES["ring-kfac"]
    core = FACTORY[algo](**hp)
    params0 = MLP_.init(seed=3)
    _, s = _core_steps(core, params0, core.init(params0, layers=LAYERS), BATCHES[:5], 0)
    s = s._replace(skipped=np.asarray(2, dtype=np.int32))
    gc.save_state(tmp_path / "s.npz", s, opt=core)
    model = _model(params0)
    opt = _torch_opt(algo, hp, model)
    opt.load(tmp_path / "s.npz")
    assert _grng(opt).host_step == 7
    assert int(_grng(opt).core.skipped) == 2



def test_grng_cupy_numpy_file_continues_in_torch(tmp_path):
    """A file from another adapter (grng_cupy on NumPy arrays, host step in its own metadata)."""
    grng_cupy = pytest.importorskip("grng_cupy")
    algo, hp = CASES["rkalman-kfac"]
    core = FACTORY[algo](**hp)
    params0 = MLP_.init(seed=3)
    p20, s20 = _core_steps(core, params0, core.init(params0, layers=LAYERS), BATCHES, 0)
    cp = grng_cupy.RKalman([p.copy() for p in params0], layers=LAYERS, **hp)
    for x, y in BATCHES[:N1]:
        b = MLP_.batch(cp.params, x, y, layer_stats=True)
        cp.step(b.grads, gc.Stats(layers=b.layers), oracle=MLP_.oracle(x, y))
    cp.save(tmp_path / "cupy.npz")
    model = _model(cp.params)
    opt = _torch_opt(algo, hp, model)
    opt.load(tmp_path / "cupy.npz")
    assert _grng(opt).host_step == cp.t == N1
    _torch_steps(opt, model, BATCHES[N1:])
    _assert_close(_torch_params(model), p20, _grng(opt).core, s20)

# ----------------------------------------------------------------- torch -> torch
def _groups(model, hp_extra=None):
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    return [{"params": weights, **(hp_extra or {})}, {"params": biases, "weight_decay": 0.0}]


def test_multi_group_round_trip_and_extract(tmp_path):
    """Two groups (weights: K-FAC without bias columns; biases: no layer, so the diagonal)."""
    hp = dict(structure="kfac", lr=0.2, rho=0.05, damping=1e-2, momentum=0.5, weight_decay=0.01)
    params0 = MLP_.init(seed=3)
    model20 = _model(params0)
    opt20 = gt.RING(_groups(model20), model=model20, **hp)
    _torch_steps(opt20, model20, BATCHES)

    model = _model(params0)
    opt = gt.RING(_groups(model), model=model, **hp)
    _torch_steps(opt, model, BATCHES[:N1])
    path = tmp_path / "multi.npz"
    opt.save(path)
    meta = gc.read_metadata(path)
    assert meta["optimizer"] is None and meta["extra"]["layout"] == "groups"
    infos = meta["extra"]["groups"]
    assert [g["structure"] for g in infos] == ["kfac", "diagonal"]
    assert infos[0]["layers"] == [[0, None], [1, None], [2, None]]
    raw = gc.load_state(path)  # NumPy, in the saved structure
    assert len(raw["groups"]) == 2 and "kfac" in raw["groups"][0]

    # a fresh optimizer of the same shape resumes exactly
    model2 = _model(_torch_params(model))
    opt2 = gt.RING(_groups(model2), model=model2, **hp)
    opt2.load(path)
    assert [_grng(opt2, i).structure for i in range(2)] == ["kfac", "diagonal"]
    _torch_steps(opt2, model2, BATCHES[N1:])
    for i in range(2):
        _assert_close([], [], _grng(opt2, i).core, _grng(opt20, i).core)
    for g, w in zip(_torch_params(model2), _torch_params(model20)):
        assert _rel(g, w) <= RTOL

    # a one-group optimizer must say which group
    single = gt.RING(model, **hp)
    with pytest.raises(ValueError, match="holds 2 param groups.*group=k"):
        single.load(path)

    # per group to another framework: extract_group writes a single-group core file
    gt.extract_group(path, 0, tmp_path / "g0.npz")
    core = gc.ring(**hp)
    weights = [p for p in _torch_params(model)[0::2]]
    layers = [gc.LayerSpec(k, None) for k in range(3)]
    st = gc.load_state(tmp_path / "g0.npz", like=core.init(weights, layers=layers), opt=core)
    _assert_close([], [], st, _grng(opt, 0).core)
    # save(group=k) writes the same
    opt.save(tmp_path / "g0b.npz", group=0)
    st_b = gc.load_state(tmp_path / "g0b.npz", like=core.init(weights, layers=layers), opt=core)
    _assert_close([], [], st_b, st)
    # group 1 (biases) as a diagonal core state, loadable into group 1 of a 2-group optimizer
    opt.save(tmp_path / "g1.npz", group=1)
    assert gc.read_metadata(tmp_path / "g1.npz")["hyperparams"]["structure"] == "diagonal"
    opt3 = gt.RING(_groups(model), model=model, **hp)
    opt3.load(tmp_path / "g1.npz", group=1)
    assert opt3.group_state(0) is None and _grng(opt3, 1).host_step == N1


def test_save_before_first_step(tmp_path):
    algo, hp = CASES["rkalman-kfac"]
    model = _model(MLP_.init(seed=3))
    opt = _torch_opt(algo, hp, model)
    opt.save(tmp_path / "fresh.npz")
    assert opt.state_dict()["state"] == {}  # saving did not create a state
    core = FACTORY[algo](**hp)
    params = _torch_params(model)
    st = gc.load_state(tmp_path / "fresh.npz", like=core.init(params, layers=LAYERS), opt=core)
    _assert_close([], [], st, core.init(params, layers=LAYERS))


def test_set_hyperparams_takes_the_files_numbers(tmp_path):
    """A scheduler changed the lr before the save: load compares by default, or copies."""
    algo, hp = CASES["ring-kfac"]
    model = _model(MLP_.init(seed=3))
    opt = _torch_opt(algo, hp, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in BATCHES[:4]:
        _torch_steps(opt, model, [(x, y)])
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.save(tmp_path / "s.npz")
    fresh = _torch_opt(algo, hp, _model(MLP_.init(seed=3)))
    with pytest.raises(ValueError, match=r"lr: file 0.05, optimizer 0.2"):
        fresh.load(tmp_path / "s.npz")
    assert fresh.state_dict()["state"] == {}
    fresh.load(tmp_path / "s.npz", set_hyperparams=True)
    assert fresh.param_groups[0]["lr"] == 0.05 and _grng(fresh).host_step == 4


# ----------------------------------------------------------------- rejected files
def _snapshot(opt):
    sd = opt.state_dict()
    return {"groups": json.dumps(sd["param_groups"], sort_keys=True, default=repr),
            "state": {pid: {k: (v if not isinstance(v, dict) else
                                {"step": v["step"], "structure": v["structure"],
                                 "layers": json.dumps(v["layers"]),
                                 "core": _flat_state(v["core"])})
                            for k, v in s.items()}
                      for pid, s in sd["state"].items()}}


def _assert_untouched(opt, snap):
    now = _snapshot(opt)
    assert now["groups"] == snap["groups"]
    assert now["state"].keys() == snap["state"].keys()
    for pid in snap["state"]:
        a, b = now["state"][pid]["grng"], snap["state"][pid]["grng"]
        assert (a["step"], a["structure"], a["layers"]) == (b["step"], b["structure"],
                                                            b["layers"])
        assert a["core"].keys() == b["core"].keys()
        for k in b["core"]:
            assert np.array_equal(a["core"][k], b["core"][k]), k


@pytest.fixture
def live(tmp_path):
    """A trained torch RING (K-FAC, momentum), a valid file of it and a snapshot."""
    algo, hp = CASES["ring-kfac"]
    model = _model(MLP_.init(seed=3))
    opt = _torch_opt(algo, hp, model)
    _torch_steps(opt, model, BATCHES[:3])
    path = tmp_path / "good.npz"
    opt.save(path)
    _torch_steps(opt, model, BATCHES[3:5])  # the live state moved on from the file
    return opt, model, path, _snapshot(opt)


def test_valid_file_loads_into_live_optimizer(live):
    opt, _, path, _ = live
    opt.load(path)
    assert _grng(opt).host_step == 3


def test_other_layer_sizes_rejected(tmp_path, live):
    opt, _, _, snap = live
    other = MLP((5, 9, 6, 3))
    # a torch file of another model, and a core file of it
    m = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 6), nn.Tanh(),
                      nn.Linear(6, 3)).double()
    o = _torch_opt("ring", CASES["ring-kfac"][1], m)
    o.save(tmp_path / "other_torch.npz")
    with pytest.raises(ValueError, match=r"shape \(9, 5\).*\(7, 5\)|does not fit"):
        opt.load(tmp_path / "other_torch.npz")
    core = gc.ring(**CASES["ring-kfac"][1])
    p = other.init(seed=0)
    st = core.init(p, layers=[gc.LayerSpec(*other.layer_keys(k)) for k in range(3)])
    gc.save_state(tmp_path / "other_core.npz", st, opt=core)
    with pytest.raises(ValueError, match=r"shape"):
        opt.load(tmp_path / "other_core.npz")
    _assert_untouched(opt, snap)


def test_other_optimizer_or_hyperparameters_rejected(tmp_path, live):
    opt, model, path, snap = live
    ring_hp = {k: v for k, v in CASES["ring-kfac"][1].items() if k != "form"}
    reng = gt.RENG(model, loss_fn=LOSS, **{**ring_hp, "rho": 0.05})
    reng.save(tmp_path / "reng.npz")
    with pytest.raises(ValueError, match="grng_torch.RENG, not RING|for optimizer 'reng'"):
        opt.load(tmp_path / "reng.npz")
    core_reng = gc.reng(**ring_hp)
    gc.save_state(tmp_path / "core_reng.npz", core_reng.init(
        _torch_params(model), layers=LAYERS), opt=core_reng)
    with pytest.raises(ValueError, match="checkpoint is for optimizer 'reng', loading into "
                                         "'ring'"):
        opt.load(tmp_path / "core_reng.npz")
    other_hp = _torch_opt("ring", {**CASES["ring-kfac"][1], "damping": 0.1}, model)
    other_hp.save(tmp_path / "damping.npz")
    with pytest.raises(ValueError, match="hyperparameters differ.*damping: file 0.1, "
                                         "optimizer 0.01"):
        opt.load(tmp_path / "damping.npz")
    # the structure is a hyperparameter too: a diagonal state cannot feed K-FAC layers
    diag = _torch_opt("ring", {**CASES["ring-kfac"][1], "structure": "diagonal"}, model)
    diag.save(tmp_path / "diag.npz")
    with pytest.raises(ValueError, match="structure: file 'diagonal', optimizer 'kfac'"):
        opt.load(tmp_path / "diag.npz")
    # a core file that records no optimizer
    gc.save_state(tmp_path / "noopt.npz", _grng(opt).core)
    with pytest.raises(ValueError, match="records no optimizer"):
        opt.load(tmp_path / "noopt.npz")
    _assert_untouched(opt, snap)


def test_kfac_layout_checked(tmp_path, live):
    opt, model, _, snap = live
    core = gc.ring(**CASES["ring-kfac"][1])
    params = _torch_params(model)
    # only the first two layers registered: valid for the model, not for this optimizer
    # (which registered all three at its first step)
    two = core.init(params, layers=LAYERS[:2])
    gc.save_state(tmp_path / "two.npz", two, opt=core)
    with pytest.raises(ValueError, match=r"K-FAC layers .* differ from the layers this "
                                         r"optimizer registered"):
        opt.load(tmp_path / "two.npz")
    # a layer without its bias column where the model's Linear has a bias at position 1: fine
    # for a fresh optimizer (registered from the file), the bias then uses the diagonal
    fresh_model = _model(params)
    fresh = _torch_opt("ring", CASES["ring-kfac"][1], fresh_model)
    fresh.load(tmp_path / "two.npz")
    assert _grng(fresh).layers == [[0, 1], [2, 3]]
    # ... and its steps are the core's with that layout (the last layer on the diagonal)
    _torch_steps(fresh, fresh_model, BATCHES[:3])
    p3, s3 = _core_steps(core, params, two, BATCHES[:3], 0, n_layers=2)
    _assert_close(_torch_params(fresh_model), p3, _grng(fresh).core, s3)
    # a transposed weight (a JAX/Flax kernel layout) does not fit a torch Linear
    tr = core.init(params, layers=[gc.LayerSpec(0, None, transposed=True)])
    gc.save_state(tmp_path / "tr.npz", tr, opt=core)
    with pytest.raises(ValueError, match="does not fit this model.s layout"):
        opt.load(tmp_path / "tr.npz")
    # a "layer" whose weight is a bias vector position is no Linear weight of the model
    two = gc.codec.encode(two)
    shifted = {**two, "kfac": {"1/-/N" if k.startswith("0/") else k: v
                               for k, v in two["kfac"].items()}}
    gc.save_state(tmp_path / "shift.npz", shifted, opt=core)
    with pytest.raises(ValueError, match="not the weight of a layer"):
        opt.load(tmp_path / "shift.npz")
    _assert_untouched(opt, snap)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "empty"])
def test_corrupted_file_rejected(tmp_path, live, damage):
    opt, _, good, snap = live
    data = good.read_bytes()
    bad = tmp_path / "bad.npz"
    if damage == "garbage":
        bad.write_bytes(b"not a checkpoint" * 20)
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        with zipfile.ZipFile(good) as z:
            info = z.getinfo("kfac/0/1/N/A.npy")
        start = info.header_offset + 30 + len(info.filename) + 200
        arr = bytearray(data)
        for i in range(start, start + 16):
            arr[i] ^= 0xFF
        bad.write_bytes(bytes(arr))
    else:
        bad.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupted|truncated|not a .npz"):
        opt.load(bad)
    _assert_untouched(opt, snap)


def _rewrite(src, dst, add):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(add)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


class _Boom:
    marker = None

    def __reduce__(self):
        return (open, (str(_Boom.marker), "w"))


def test_pickled_npz_rejected(tmp_path, live):
    opt, _, good, snap = live
    _Boom.marker = tmp_path / "PWNED"
    payload = np.empty(1, dtype=object)
    payload[0] = _Boom()
    evil = tmp_path / "evil.npz"
    _rewrite(good, evil, {"momentum/0": payload})
    with pytest.raises(ValueError, match="pickled Python object.*refusing"):
        opt.load(evil)
    assert not _Boom.marker.exists()
    _assert_untouched(opt, snap)


def test_missing_file(tmp_path, live):
    opt, _, _, snap = live
    with pytest.raises(FileNotFoundError):
        opt.load(tmp_path / "nope.npz")
    _assert_untouched(opt, snap)


def test_save_is_atomic(tmp_path, live, monkeypatch):
    opt, _, good, _ = live
    before = good.read_bytes()

    def broken(f, arrays):
        f.write(b"PK\x03\x04" + b"\0" * 64)
        raise OSError("No space left on device")

    monkeypatch.setattr(npz_io, "_write_npz", broken)
    with pytest.raises(OSError, match="No space"):
        opt.save(good)
    monkeypatch.undo()
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz"]


class _TokenTagger(nn.Module):
    """An nn.Embedding on token ids (B, T) under K-FAC (layout "TD") and a linear head."""

    def __init__(self):
        super().__init__()
        self.tok, self.head = nn.Embedding(11, 6), nn.Linear(6, 11)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x))).reshape(-1, 11)


def _zoo_or_tagger(name):
    """(model, step(opt, k)) for GPT-2 (Conv1D weights stored (in, out): layout "T") or the
    tagger (an embedding: "TD")."""
    if name == "gpt2":
        pytest.importorskip("transformers")
        from tests.torch.zoo import gpt2

        z = gpt2(vocab=48, B=4, T=8)
        return z.model.double(), z.step
    torch.manual_seed(0)
    model = _TokenTagger().double()

    def step(opt, k):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 11, (20,), generator=g)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return opt.step(closure)

    return model, step


@pytest.mark.parametrize("name,layout", [("gpt2", "/T/"), ("tagger", "/TD/")])
def test_transposed_and_embedding_layers_resume_bit_identically(tmp_path, name, layout):
    """`opt.save` / `opt.load` of K-FAC layers whose weights are stored (in, out) (GPT-2's
    Conv1D) or are embedding tables: the file's layouts are this model's, so it loads (both
    were refused as "transposed" before), and the resumed run equals the uninterrupted one."""
    model, step = _zoo_or_tagger(name)
    opt = gt.RING(model.parameters(), model=model)
    for k in range(6):
        step(opt, k)
    want = [p.detach().clone() for p in model.parameters()]
    model, step = _zoo_or_tagger(name)
    opt = gt.RING(model.parameters(), model=model)
    for k in range(3):
        step(opt, k)
    opt.save(tmp_path / "c.npz")
    assert any(layout in k for k in np.load(tmp_path / "c.npz").files)
    model2, step2 = _zoo_or_tagger(name)
    model2.load_state_dict(model.state_dict())
    opt2 = gt.RING(model2.parameters(), model=model2)
    opt2.load(tmp_path / "c.npz")
    for k in range(3, 6):
        step2(opt2, k)
    for p, w in zip(model2.parameters(), want, strict=True):
        assert torch.equal(p, w)


@pytest.mark.parametrize("name", ["RING", "RENG", "RKalman"])
@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float64),
                                     (torch.float64, torch.float32)], ids=["32to64", "64to32"])
def test_a_state_dict_loads_into_the_model_in_another_dtype(name, src, dst):
    """As torch.optim casts loaded state to the parameters' dtype: a float32 run resumed in
    float64 (and back) was refused as "a different model"; now its state is cast, and the
    resumed run follows the run continued in the saved dtype to that dtype's rounding."""
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(3, 16, 8, generator=g), torch.randint(0, 3, (3, 16), generator=g)

    def model(dtype):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)

    def run(opt, m, steps, dtype):
        for t in steps:
            opt.step(closure_for(opt, m, crit, xs[t % 3].to(dtype), ys[t % 3]))

    m = model(src)
    opt = getattr(gt, name)(m.parameters(), model=m)
    run(opt, m, range(25), src)  # past the warm-up
    saved = opt.state_dict()
    m2 = model(dst)
    m2.load_state_dict({k: v.to(dst) for k, v in m.state_dict().items()})
    opt2 = getattr(gt, name)(m2.parameters(), model=m2)
    opt2.load_state_dict(saved)
    run(opt2, m2, range(25, 35), dst)
    run(opt, m, range(25, 35), src)
    for a, b in zip(m2.parameters(), m.parameters()):
        assert a.dtype == dst
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
