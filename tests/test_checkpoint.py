"""Portable checkpoints (grng_core.checkpoint) at the core level: save in one backend, load in
another and continue exactly; corrupted, mismatched and pickle-holding files are rejected with
clear errors and leave the live state untouched; writes are atomic."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np
import pytest

import grng_core as gc
from grng_core import checkpoint, npz_io
from grng_core.checkpoint import load_state, read_metadata, save_state
from grng_core.reference import MLP
from tests import cases
from tests.backends import BACKEND_NAMES, get_backend

SIZES = (5, 7, 3)
B = 8
MLP_ = MLP(SIZES)
LAYERS = [gc.LayerSpec(*MLP_.layer_keys(k)) for k in range(MLP_.n_layers)]


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((B, SIZES[0]))
        y = np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], B)]
        out.append((x, y))
    return out


# rows of the table (tests/cases.py) with rich states: momentum lists, K-FAC factors and
# inverses, Kalman traces, diagonals; this suite's hyperparameters
OPTIMIZERS = {
    "ring_kfac": cases.get("ring/kfac/-").using(
        lr=0.1, rho=0.05, damping=1e-2, momentum=0.5, inverse_every=3),
    "rkalman_kfac": cases.get("rkalman/kfac/fin_diff").using(
        lr=0.2, rho=0.05, damping=1e-2, momentum=0.5, inverse_every=3),
    "reng_diagonal": cases.get("reng/diagonal/fin_diff").using(
        lr=0.01, rho=0.05, damping=1e-2, weight_decay=1e-3),
}


def _train(be, opt, params, state, batches, t0):
    """Core API steps on backend `be` with host refresh flags; t0 = steps already taken."""
    req = opt.requirements
    for t, (x, y) in enumerate(batches, start=t0 + 1):
        x, y = be.asarray(x), be.asarray(y)
        curvature, inverse = opt.flags(t - 1)
        b = MLP_.batch(params, x, y, per_example=req.per_example_grads,
                       layer_stats=req.layer_stats and curvature)
        stats = gc.Stats(per_example_grads=b.per_example_grads, layers=b.layers)
        updates, state = opt.update(b.grads, state, params, stats, MLP_.oracle(x, y),
                                    curvature=curvature, inverse=inverse)
        params = gc.apply_updates(params, updates)
    return params, state


def _init(be, opt):
    params = be.tree(MLP_.init(seed=1))
    return params, opt.init(params, layers=LAYERS if opt.config.structure == "kfac"
                            else None)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def _state_np(state):
    return {k: v for k, v in checkpoint.state_to_numpy(state).items()
            if k != checkpoint.META_KEY}


needs = pytest.mark.skipif(not {"torch", "jax"} <= set(BACKEND_NAMES),
                           reason="needs torch and jax")


@needs
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("src,dst", [("torch", "jax"), ("jax", "torch"), ("torch", "numpy")])
def test_save_load_continue_equals_uninterrupted(tmp_path, name, src, dst):
    """10 steps in src, save, load in dst, 10 more steps == 20 steps in src (rel 1e-10)."""
    make = OPTIMIZERS[name].build
    batches = _batches(20)
    a, b = get_backend(src), get_backend(dst)

    opt = make()
    p20, s20 = _train(a, opt, *_init(a, opt), batches, 0)

    p10, s10 = _train(a, opt, *_init(a, opt), batches[:10], 0)
    path = tmp_path / "state.npz"
    save_state(path, s10, opt)

    opt_b = make()  # a fresh optimizer with the same hyperparameters, as after a restart
    params_b = b.tree([np.array(a.to_numpy(p)) for p in p10])
    like = opt_b.init(params_b, layers=LAYERS if opt_b.config.structure == "kfac"
                      else None)
    loaded = load_state(path, like=like, opt=opt_b)
    # the loaded state is of the destination library and equals what was saved
    leaf = loaded.step
    assert type(leaf) is type(like.step)
    assert int(b.to_numpy(leaf)) == 10
    for k, v in _state_np(loaded).items():
        assert np.array_equal(v, _state_np(s10)[k]), k
    p_cont, s_cont = _train(b, opt_b, params_b, loaded, batches[10:], 10)

    for x, y in zip(p_cont, p20):
        assert _rel(b.to_numpy(x), a.to_numpy(y)) <= 1e-10
    want = _state_np(s20)
    for k, v in _state_np(s_cont).items():
        assert _rel(v, want[k]) <= 1e-10, k


def test_file_layout_and_metadata(tmp_path):
    opt = gc.ring(lr=lambda t: 0.1, rho=0.05, damping=1e-2, structure="kfac", momentum=0.5,
                  form="gauss_newton")
    be = get_backend("numpy")
    _, state = _init(be, opt)
    path = tmp_path / "ck"  # used as given: no ".npz" appended
    save_state(path, state, opt, extra={"epoch": 3})
    assert os.path.exists(path) and not os.path.exists(str(path) + ".npz")
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
        assert z[checkpoint.META_KEY].dtype == np.uint8
    assert {"step", "skipped", "curvature_count", "momentum/0", "kfac/0/1/N/A",
            "kfac/2/3/N/S_inv"} <= names
    meta = read_metadata(path)
    assert meta["version"] == checkpoint.FORMAT_VERSION
    assert meta["optimizer"] == "ring"
    assert meta["hyperparams"]["lr"] == ("schedule(1: 0.1, 2: 0.1, 5: 0.1, 10: 0.1, "
                                         "100: 0.1, 1000: 0.1, 10000: 0.1, 100000: 0.1)")
    assert meta["hyperparams"]["damping"] == 1e-2
    assert meta["extra"] == {"epoch": 3}
    assert meta["library"] == "numpy"
    # like=None: NumPy arrays in the saved structure
    raw = load_state(path)
    assert isinstance(raw["kfac"]["0/1/N"]["A"], np.ndarray)
    assert isinstance(raw["momentum"], list) and len(raw["momentum"]) == 4
    # the same schedule-carrying optimizer validates (the same values on both sides)
    load_state(path, like=state, opt=opt)


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_round_trip_every_backend(tmp_path, backend_name):
    be = get_backend(backend_name)
    opt = OPTIMIZERS["rkalman_kfac"].build()
    params, state = _init(be, opt)
    params, state = _train(be, opt, params, state, _batches(2), 0)
    save_state(tmp_path / "s.npz", state, opt)
    out = load_state(tmp_path / "s.npz", like=state, opt=opt)
    assert out is not state
    got, want = _state_np(out), _state_np(state)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    assert type(out.curvature.kfac[0].A) is type(state.curvature.kfac[0].A)


def test_dtype_follows_template(tmp_path):
    np_be = get_backend("numpy")
    opt = OPTIMIZERS["ring_kfac"].build()
    _, s64 = _init(np_be, opt)
    save_state(tmp_path / "s.npz", s64, opt)
    p32 = [np.asarray(p, dtype=np.float32) for p in MLP_.init(seed=1)]
    like32 = opt.init(p32, layers=LAYERS)
    out = load_state(tmp_path / "s.npz", like=like32, opt=opt)
    assert out.curvature.kfac[0].A.dtype == np.float32
    assert out.step.dtype == np.int32


# ---------------------------------------------------------------- rejected files
def _snapshot(state):
    return {k: v.copy() for k, v in _state_np(state).items()}


def _assert_untouched(state, snap):
    now = _state_np(state)
    assert now.keys() == snap.keys()
    for k in snap:
        assert np.array_equal(now[k], snap[k]), k


@pytest.fixture
def live(tmp_path):
    """A trained NumPy state, its optimizer, a valid checkpoint of it and a snapshot."""
    be = get_backend("numpy")
    opt = OPTIMIZERS["ring_kfac"].build()
    params, state = _train(be, opt, *_init(be, opt), _batches(3), 0)
    path = tmp_path / "good.npz"
    save_state(path, state, opt)
    return opt, state, path, _snapshot(state)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "empty"])
def test_corrupted_file_rejected(tmp_path, live, damage):
    opt, state, good, snap = live
    data = good.read_bytes()
    bad = tmp_path / "bad.npz"
    if damage == "garbage":
        bad.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # flip bytes inside an array's data: the zip CRC catches it
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
        load_state(bad, like=state, opt=opt)
    _assert_untouched(state, snap)


def test_missing_file_is_file_not_found(tmp_path, live):
    opt, state, _, _ = live
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state(tmp_path / "nope.npz", like=state, opt=opt)


def test_mismatched_shapes_rejected(tmp_path, live):
    opt, state, _, snap = live
    other = MLP((5, 9, 3))
    p = other.init(seed=0)
    st = opt.init(p, layers=[gc.LayerSpec(*other.layer_keys(k)) for k in range(2)])
    path = tmp_path / "other.npz"
    save_state(path, st, opt)
    with pytest.raises(ValueError, match=r"at 'momentum/0' the file has shape \(9, 5\), "
                                         r"the template \(7, 5\)"):
        load_state(path, like=state, opt=opt)
    _assert_untouched(state, snap)


def test_mismatched_keys_rejected(tmp_path, live):
    opt, state, _, snap = live
    no_momentum = gc.ring(lr=0.1, rho=0.05, damping=1e-2, structure="kfac", inverse_every=3)
    st = no_momentum.init(MLP_.init(seed=1), layers=LAYERS)
    path = tmp_path / "nomom.npz"
    save_state(path, st)  # no optimizer recorded: the structure check still applies
    with pytest.raises(ValueError, match="keys do not match.*lacks \\['momentum'\\]"):
        load_state(path, like=state)
    _assert_untouched(state, snap)


def test_other_optimizer_or_hyperparameters_rejected(live):
    opt, state, path, snap = live
    other = gc.reng(lr=0.1, rho=0.05, damping=1e-2, structure="kfac", momentum=0.5,
                    inverse_every=3)
    with pytest.raises(ValueError, match="for optimizer 'ring', loading into 'reng'"):
        load_state(path, like=state, opt=other)
    lr2 = gc.ring(lr=0.2, rho=0.05, damping=1e-2, structure="kfac", momentum=0.5,
                  inverse_every=3)
    with pytest.raises(ValueError, match="hyperparameters differ.*lr: file 0.1, optimizer 0.2"):
        load_state(path, like=state, opt=lr2)
    sched = gc.ring(lr=lambda t: 0.1, rho=0.05, damping=1e-2, structure="kfac", momentum=0.5,
                    inverse_every=3)
    with pytest.raises(ValueError, match=r"lr: file 0.1, optimizer 'schedule\(1: 0.1, 2: "):
        load_state(path, like=state, opt=sched)
    same = dataclasses.asdict(opt.config)
    for lr in (0.2, lambda t: 0.1):  # resuming with another learning rate, when asked for
        other_lr = gc.ring(**{**same, "lr": lr})
        with pytest.raises(ValueError, match=r"differ.*\(lr: file 0.1, optimizer [^;]*\); "
                                             r"to resume .* allow_changed=\('lr',\)"):
            load_state(path, like=state, opt=other_lr)
        back = load_state(path, like=state, opt=other_lr, allow_changed=("lr",))
        _assert_untouched(back, snap)  # the saved state, array for array
    with pytest.raises(ValueError, match=r"for optimizer 'ring', loading into 'reng'"):
        load_state(path, like=state, opt=other, allow_changed=("lr",))
    with pytest.raises(ValueError, match=r"allow_changed names no hyperparameter of ring: "
                                         r"\['learning_rate'\]"):  # the core spells it lr
        load_state(path, like=state, opt=opt, allow_changed=("learning_rate",))
    _assert_untouched(state, snap)


def test_the_refusal_offers_allow_changed_only_for_values_the_step_reads(tmp_path):
    """lr (a value the step reads) can change on a resume; structure shapes the state, so
    the refusal does not offer allow_changed for it (loading would fail on the layout)."""
    mlp = MLP((3, 4, 2))
    params, layers = mlp.init(seed=0), [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(2)]
    opt = gc.ring(structure="kfac")
    path = tmp_path / "k.npz"
    save_state(path, opt.init(params, layers=layers), opt)
    diag = gc.ring(structure="diagonal", lr=0.3)
    with pytest.raises(ValueError) as err:
        load_state(path, like=diag.init(params), opt=diag)
    assert str(err.value).endswith(
        "structure shapes the state: build the optimizer with the file's values, then "
        "allow_changed=('lr',) keeps the optimizer's values of the rest")


def _rewrite(src, dst, edit_meta=None, add=None):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if edit_meta is not None:
        meta = json.loads(arrays[checkpoint.META_KEY].tobytes())
        edit_meta(meta)
        arrays[checkpoint.META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    arrays.update(add or {})
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_newer_format_version_rejected(tmp_path, live):
    opt, state, path, snap = live
    newer = tmp_path / "newer.npz"
    _rewrite(path, newer, edit_meta=lambda m: m.update(version=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="format version 2, newer than this grng reads"):
        load_state(newer, like=state, opt=opt)
    _assert_untouched(state, snap)


def test_not_a_grng_checkpoint(tmp_path, live):
    opt, state, _, snap = live
    plain = tmp_path / "plain.npz"
    np.savez(plain, step=np.int32(3))
    with pytest.raises(ValueError, match="not a GRNG optimizer-state checkpoint"):
        load_state(plain, like=state, opt=opt)
    _assert_untouched(state, snap)


class _Boom:
    """Unpickling this would create a marker file: proof that loading ran code."""

    marker = None

    def __reduce__(self):
        return (open, (str(_Boom.marker), "w"))


def test_pickled_object_rejected_and_never_executed(tmp_path, live):
    opt, state, path, snap = live
    _Boom.marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = _Boom()
    _rewrite(path, evil, add={"kfac/0/1/N/A": payload})  # replaces a real entry
    with pytest.raises(ValueError, match="pickled Python object.*refusing"):
        load_state(evil, like=state, opt=opt)
    assert not _Boom.marker.exists()
    # an extra pickled entry is rejected too
    evil2 = tmp_path / "evil2.npz"
    _rewrite(path, evil2, add={"extra": payload})
    with pytest.raises(ValueError, match="pickled"):
        load_state(evil2, like=state, opt=opt)
    assert not _Boom.marker.exists()
    _assert_untouched(state, snap)


def test_edited_entries_rejected(tmp_path, live):
    opt, state, path, snap = live
    extra = tmp_path / "extra.npz"
    _rewrite(path, extra, add={"smuggled": np.zeros(3)})
    with pytest.raises(ValueError, match="unexpected \\['smuggled'\\]"):
        load_state(extra, like=state, opt=opt)
    reshaped = tmp_path / "reshaped.npz"
    _rewrite(path, reshaped, add={"kfac/0/1/N/A": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="metadata says"):
        load_state(reshaped, like=state, opt=opt)
    _assert_untouched(state, snap)


def test_int_float_mismatch_rejected(tmp_path, live):
    opt, state, path, snap = live
    bad = tmp_path / "floatstep.npz"

    def edit(m):
        for s in m["arrays"]:
            if s["name"] == "step":
                s["dtype"] = "float64"

    _rewrite(path, bad, edit_meta=edit, add={"step": np.float64(3.0)})
    with pytest.raises(ValueError, match="at 'step' the file has dtype float64, the template "
                                         "int32"):
        load_state(bad, like=state, opt=opt)
    _assert_untouched(state, snap)


# ---------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_atomic_write_keeps_previous_checkpoint(tmp_path, live, monkeypatch, fail_at):
    opt, state, path, snap = live
    before = path.read_bytes()
    be = get_backend("numpy")
    _, newer = _train(be, opt, *_init(be, opt), _batches(5, seed=3), 0)

    if fail_at == "write":
        def broken(f, arrays):  # writes half an archive, then the disk "fails"
            f.write(b"PK\x03\x04" + b"\0" * 100)
            raise OSError("No space left on device")

        monkeypatch.setattr(npz_io, "_write_npz", broken)
    else:
        def broken_replace(src, dst):
            raise OSError("simulated crash before the rename")

        monkeypatch.setattr(npz_io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space|simulated crash"):
        save_state(path, newer, opt)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]  # no temporary file left behind
    got = load_state(path, like=state, opt=opt)
    for k, v in _state_np(got).items():
        assert np.array_equal(v, snap[k])


def test_save_rejects_non_arrays(tmp_path):
    with pytest.raises(TypeError, match="not an array"):
        save_state(tmp_path / "x.npz", {"step": "three"})
    assert not os.listdir(tmp_path)


@pytest.mark.skipif("jax" not in BACKEND_NAMES, reason="needs jax")
def test_save_inside_jit_is_a_clear_error(tmp_path):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(x):
        save_state(tmp_path / "x.npz", {"step": x})
        return x

    with pytest.raises(TypeError, match="outside jax.jit"):
        f(jnp.zeros((), dtype=jnp.int32))


@pytest.mark.skipif("torch" not in BACKEND_NAMES, reason="needs torch")
def test_in_memory_form_survives_a_torch_state_dict(tmp_path):
    """state_to_numpy -> tensors (as a torch adapter's state_dict would keep them) -> back."""
    import torch

    be = get_backend("torch")
    opt = OPTIMIZERS["rkalman_kfac"].build()
    params, state = _train(be, opt, *_init(be, opt), _batches(2), 0)
    sd = {k: torch.from_numpy(v) for k, v in checkpoint.state_to_numpy(state, opt).items()}
    torch.save(sd, tmp_path / "sd.pt")
    back = torch.load(tmp_path / "sd.pt", weights_only=True)
    out = checkpoint.state_from_numpy(back, like=state, opt=opt)
    for k, v in _state_np(out).items():
        assert np.array_equal(v, _state_np(state)[k]), k


def test_adaptive_damping_layout_and_the_other_form_is_refused(tmp_path):
    """Eigenbases instead of inverses (§3.2); a checkpoint of one RING form is refused by the
    other with a message naming the form."""
    opt = gc.ring(lr=0.1, rho=0.05, damping=1e-2, structure="kfac", inverse_every=3)
    be = get_backend("numpy")
    _, state = _init(be, opt)
    path = tmp_path / "ck.npz"
    save_state(path, state, opt)
    with np.load(path, allow_pickle=False) as z:
        assert {"kfac/2/3/N/S_vecs", "kfac/2/3/N/S_vals", "kfac/0/1/N/A_vecs"} <= set(z.files)
        assert "kfac/0/1/N/A_inv" not in z.files
    other = gc.ring(lr=0.1, rho=0.05, damping=1e-2, structure="kfac", inverse_every=3,
                    form="gauss_newton")
    with pytest.raises(ValueError, match="form: file 'adaptive_damping', optimizer "
                                         "'gauss_newton'"):
        load_state(path, like=_init(be, other)[1], opt=other)


def _with_schedule(lr):
    return gc.ring(lr=lr, rho=0.05, damping=1e-2, structure="kfac", momentum=0.5,
                   form="gauss_newton")


def test_a_schedule_is_checked_by_its_values(tmp_path):
    """A file saved under one schedule and loaded into an optimizer with another is refused,
    naming both by their values (before, both were '<callable>' and any schedule loaded);
    the same schedule, rebuilt, loads; so does a file of the older format."""
    warm = _with_schedule(lambda t: 0.1 * min(1.0, t / 10))
    _, state = _init(get_backend("numpy"), warm)
    path = tmp_path / "s.npz"
    save_state(path, state, warm)
    load_state(path, like=state, opt=_with_schedule(lambda t: 0.1 * min(1.0, t / 10)))
    with pytest.raises(ValueError, match=r"lr: file 'schedule\(1: 0.01, 2: 0.02, .*"
                                         r"optimizer 'schedule\(1: 0.05, 2: 0.1, "):
        load_state(path, like=state, opt=_with_schedule(lambda t: 0.1 * min(1.0, t / 2)))
    with pytest.raises(ValueError, match="lr: file 'schedule"):
        load_state(path, like=state, opt=_with_schedule(0.1))
    old = checkpoint.state_to_numpy(state, warm)  # the format before: '<callable>'
    meta = json.loads(old[checkpoint.META_KEY].tobytes())
    meta["hyperparams"]["lr"] = "<callable>"
    old[checkpoint.META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
    checkpoint.state_from_numpy(old, like=state, opt=_with_schedule(lambda t: 0.5))


def test_a_schedule_is_called_with_the_1_based_step_and_compared_with_a_tolerance(tmp_path):
    """An inverse square root (undefined at t = 0: before, such a schedule was recorded as
    '<callable>' and any other one loaded): recorded by its values; the same values within
    float32 rounding (another device) load, a 0.1% change does not."""
    rsqrt = _with_schedule(lambda t: 0.1 * t ** -0.5)
    _, state = _init(get_backend("numpy"), rsqrt)
    assert checkpoint.hyperparams_json(rsqrt)["lr"].startswith("schedule(1: 0.1, 2: 0.0707107")
    path = tmp_path / "s.npz"
    save_state(path, state, rsqrt)
    load_state(path, like=state, opt=_with_schedule(lambda t: 0.1 * t ** -0.5 * (1 + 3e-7)))
    with pytest.raises(ValueError, match="lr: file 'schedule"):
        load_state(path, like=state, opt=_with_schedule(lambda t: 0.1 * t ** -0.5 * 1.001))


def test_a_callable_that_is_not_a_schedule_is_recorded_as_such():
    assert checkpoint.hyperparams_json(_with_schedule(lambda t, x: 0.1))["lr"] == "<callable>"
