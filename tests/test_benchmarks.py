"""Cheap checks of the benchmark harness (benchmarks/): FLOP counting, report formatting,
target logic, data, and a tiny end-to-end run. Optional peer packages (ASDL, pytorch-optimizer,
IVON, heavyball, kfac-jax, matplotlib, tqdm) are skipped when absent: the test extra lacks them.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import flops as F  # noqa: E402
from benchmarks import formatting as Fmt  # noqa: E402
from benchmarks import report as R  # noqa: E402
from benchmarks.run_result import RunResult  # noqa: E402
from benchmarks.suite import best_of, final_runs  # noqa: E402


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


# ---------------------------------------------------------------------------------------------
# FLOP counter


def test_flop_counter_matches_hand_count_for_mlp():
    from benchmarks.models import mlp

    sizes, b = (20, 16, 12, 3), 7
    model = mlp(sizes, "relu")
    x, y = torch.randn(b, sizes[0]), torch.randint(0, 3, (b,))
    with F.MatmulRecorder() as rec:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    # hand count: forward 2*B*(20*16 + 16*12 + 12*3); weight grads the same; input grads of
    # the last two layers only
    fwd = 2 * b * (20 * 16 + 16 * 12 + 12 * 3)
    hand = fwd + fwd + 2 * b * (16 * 12 + 12 * 3)
    assert rec.flops == hand == F.mlp_fb_flops(sizes, b)
    assert sum(rec.ops.values()) == 3 + 3 + 2


def test_flop_formulas_of_factorisations_and_products():
    assert F.op_flops(("mm", 1, 4, 5, 6)) == 2 * 4 * 5 * 6
    assert F.op_flops(("mm", 3, 4, 5, 6)) == 3 * 2 * 4 * 5 * 6
    assert F.op_flops(("chol", 1, 9, 0, 0)) == pytest.approx(9**3 / 3)
    assert F.op_flops(("trsm", 1, 9, 0, 2)) == 9 * 9 * 2
    A = torch.randn(6, 6, dtype=torch.float64)
    A = A @ A.T + 6 * torch.eye(6, dtype=torch.float64)
    with F.MatmulRecorder() as rec:
        L = torch.linalg.cholesky(A)
        torch.linalg.solve_triangular(L, torch.eye(6, dtype=torch.float64), upper=False)
    kinds = {k[0] for k in rec.ops}
    assert {"chol", "trsm"} <= kinds


def test_conv_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.models import small_cnn

    model = small_cnn()
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 10, (3,))
    with F.MatmulRecorder() as rec:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert rec.flops == fc.get_total_flops()


def test_subtract_is_a_multiset_difference():
    from collections import Counter

    a = Counter({("mm", 1, 2, 3, 4): 25, ("chol", 1, 5, 0, 0): 2})
    part = Counter({("mm", 1, 2, 3, 4): 2})
    own = F.subtract(a, part, 10)
    assert own == Counter({("mm", 1, 2, 3, 4): 5, ("chol", 1, 5, 0, 0): 2})


def test_throughput_ideal_time_is_flops_over_rate():
    from collections import Counter

    tp = F.Throughput(min_time=0.001)
    rate = tp.of(8, 8, 8)
    assert rate > 0
    t = tp.ideal_time(Counter({("mm", 1, 8, 8, 8): 3}))
    assert t == pytest.approx(3 * 2 * 8**3 / rate)


# ---------------------------------------------------------------------------------------------
# report formatting from synthetic results


def _run(opt, seed, test, ttt, gnorm, *, label=None, hp=None, sweep=False, status="ok"):
    r = RunResult("digits_mlp", opt, label or opt.upper(), hp or {"lr": 0.1}, seed,
                  status=status, sweep=sweep)
    r.final_test, r.final_valid, r.final_loss = test, test, 0.1
    r.select_valid = test
    r.time_to_target, r.grad_norm = ttt, gnorm
    r.step_time, r.fb_time, r.peak_mem_mb = 0.002, 0.0005, 1.0
    return r


def test_fmt_pm_and_markdown_table():
    assert Fmt.fmt_pm([0.94, 0.96], 3) == "0.950 ± 0.014"
    assert Fmt.fmt_pm([0.5], 2) == "0.50"
    assert Fmt.fmt_pm([math.nan, None], 2) == "–"
    t = Fmt.markdown_table(["a", "b"], [["x", "1"], ["y", "2"]])
    assert t.splitlines() == ["| a | b |", "| --- | ---: |", "| x | 1 |", "| y | 2 |"]


def test_results_table_aggregates_over_seeds():
    runs = [_run("ring", 0, 0.96, 1.0, 0.01), _run("ring", 1, 0.98, 3.0, 0.03),
            _run("adamw", 0, 0.90, math.nan, 0.2)]
    rows = R.summary_rows(runs)
    table = R.results_table(rows, "accuracy")
    lines = table.splitlines()
    assert len(lines) == 2 + 2
    ring = next(line for line in lines if line.startswith("| RING"))
    assert "0.9700 ± 0.0141" in ring  # test accuracy
    assert "2.00 ± 1.41" in ring  # time to target
    assert "| 2/2 |" in ring
    assert "1.50" in ring  # optimizer overhead (ms) = 2.0 - 0.5
    adam = next(line for line in lines if line.startswith("| ADAMW"))
    assert "| 0/1 |" in adam and "| – |" in adam


def test_digits_target_logic():
    runs = [_run("ring", s, 0.97, 1.0, 0.01, label="RING") for s in range(2)]
    runs += [_run("adamw", s, 0.95, 2.0, 0.1, label="AdamW") for s in range(2)]
    runs += [_run("asdl_kfac", s, 0.96, 1.5, 0.02, label="K-FAC") for s in range(2)]
    lines = R.digits_targets(R.summary_rows(runs))
    assert "MET" in lines[0] and "NOT MET" not in lines[0]
    # slower than K-FAC: not met
    runs[-1].time_to_target = runs[-2].time_to_target = 0.5
    lines = R.digits_targets(R.summary_rows(runs))
    assert "NOT MET" in lines[0]
    # a seed that misses the target counts as infinitely slow
    runs[0].time_to_target = math.nan
    runs[-1].time_to_target = runs[-2].time_to_target = 5.0
    assert "NOT MET" in R.digits_targets(R.summary_rows(runs))[0]


def test_selection_uses_validation_not_test():
    from benchmarks.tasks import make_task

    task = make_task("digits_mlp", subset=64)
    a = _run("ring", 0, 0.9, 1.0, 0.1, hp={"lr": 0.1}, sweep=True)
    b = _run("ring", 0, 0.9, 1.0, 0.1, hp={"lr": 0.3}, sweep=True)
    a.select_valid, a.final_test = 0.95, 0.80
    b.select_valid, b.final_test = 0.90, 0.99
    c = _run("ring", 0, 0.9, 1.0, 0.1, hp={"lr": 1.0}, sweep=True, status="diverged")
    c.select_valid = math.nan
    assert best_of(task, [a, b, c]) is a
    info = {"selected": {"digits_mlp/ring": {"lr": 0.1}}}
    later = _run("ring", 1, 0.9, 1.0, 0.1, hp={"lr": 0.1})
    assert final_runs([a, b, c, later], info) == [a, later]


def test_stepcost_tables_and_targets_from_synthetic_results():
    from benchmarks import stepcost_report as S

    res = {"threads": 2, "refresh_every": 10, "peak_square_gflops": 50.0, "batches": {
        1024: {"fb": 0.010, "hvp_extra": 0.012, "rows": {
            "adamw": {"label": "AdamW", "time": 0.012},
            "asdl_kfac": {"label": "K-FAC (ASDL)", "time": 0.030},
            "ring": {"label": "RING (kfac)", "time": 0.025, "own_flops": 1e9,
                     "ideal_time": 0.009},
            "reng": {"label": "RENG", "time": 0.040},
            "rkalman": {"label": "R-Kalman (kfac)", "time": 0.035},
            "ring_woodbury": {"label": "RING (woodbury)", "error": "skipped: too big"},
        }, "jax": {"jax_fb": {"label": "fb", "time": 0.005},
                   "kfac_jax": {"label": "kfac-jax", "error": "not runnable: X"}}}}}
    lines = S.targets(res)
    text = "\n".join(lines)
    assert "RING kfac 25.00 ms vs ASDL K-FAC 30.00 ms" in text and "0.83x -> MET" in text
    assert "RENG (double backprop) 40.00 ms vs RING + HVP extra 37.00 ms: 1.08x -> NOT MET" \
        in text
    assert "1.40x -> NOT MET (target <= 1.3x)" in text
    assert "skipped: too big" in text
    assert "60% of the measured matmul throughput" in text and "MET (target >= 50%)" in text
    tables = S.tables(res)
    assert "| RING (kfac) | 25.00 | 2.08 | 2.50 | 1.000 | 66.7 | 60% |" in tables
    assert "not runnable: X" in tables


def _synthetic_stepcost_res():
    rows = {"adamw": {"label": "AdamW", "time": 0.010},
            "asdl_kfac": {"label": "K-FAC (ASDL)", "time": 0.040, "own_flops": 2e9,
                          "ideal_time": 0.020, "factored_applies": False,
                          "kfac_layers": [{"layer": "8->4", "factored": True}]},
            "ring": {"label": "RING (kfac)", "time": 0.030, "own_flops": 1e9,
                     "ideal_time": 0.010, "factored_applies": True,
                     "eigh_floor": {"seconds": 0.020, "per_refresh": 0.2, "sizes": [9, 4]},
                     "kfac_layers": [{"layer": "8->4", "factored": True},
                                     {"layer": "4->2", "factored": False}]},
            "ring_gn": {"label": "RING (kfac, gauss_newton form)", "time": 0.012}}

    def out(scale, b=128):
        return {"fb": 0.005 * scale, "net": "MLP x", "batch": b,
                "rows": {k: dict(v, time=v["time"] * scale) for k, v in rows.items()}}

    jax = {"jax_fb": {"label": "fb", "time": 0.004},
           "jax_ring": {"label": "g", "time": 0.050, "max_plain": 0.040, "median": 0.020,
                        "spread": 2.0},
           "jax_ring_ref": {"label": "h", "time": 0.045, "spread": 1.1},
           "jax_ring_host": {"label": "hh", "time": 0.025}}
    return {"threads": 1, "refresh_every": 10, "peak_square_gflops": 50.0,
            "batches": {128: dict(out(1.0), hvp_extra=0.01, jax=jax)},
            "widths": {256: out(0.1), 2048: out(1.0)}, "digits": out(0.05, 64)}


def test_stepcost_issue_11_targets_from_synthetic_results(tmp_path):
    from benchmarks import stepcost_report as S

    res = _synthetic_stepcost_res()
    text = "\n".join(S.targets(res))
    # batch 128: RING / ASDL <= 0.6
    assert "RING kfac 30.00 ms vs ASDL K-FAC 40.00 ms" in text
    assert "0.75x -> NOT MET (target <= 0.6x)" in text
    assert "own work 1.000 GFLOP/step in 25.00 ms = 40% of the measured matmul" in text
    assert "K-FAC layers: 8->4 factored, 4->2 dense" in text
    assert "factored form does not apply" in text  # ASDL
    # JAX: grng / hand-written <= 1.2, spread <= 1.5
    assert "50.00 ms vs the same math by hand" in text and "1.11x -> MET (target <= 1.2x)" in text
    assert "2.00x -> NOT MET (target <= 1.5x)" in text and "refresh picked on the host" in text
    # width d = 2048: RING / ASDL <= 0.4, RING / AdamW <= 4; growth exponent from d = 256
    assert "vs ASDL K-FAC 40.00 ms: 0.75x -> NOT MET (target <= 0.4x)" in text
    assert "vs AdamW 10.00 ms: 3.00x -> MET (target <= 4x)" in text
    assert "d = 256..2048: step time grows as d^k, k = RING 1.11" in text
    # digits: RING <= 0.8x ASDL
    assert "batch 64: RING kfac 1.500 ms vs ASDL K-FAC 2.000 ms: 0.75x -> MET" in text
    # where the default form misses, the eigendecompositions' share of the budget
    assert "the target allows 24.00 ms a step, of which the default form's eigendecompositions " \
        "alone take 20.00 ms (83%); the step without them: 10.00 ms" in text
    assert "factors 9, 4, 200.0 ms a refresh) take 20.00 ms (67%)" in text
    # the gauss_newton form, judged on the same targets beside the default form
    assert "RING kfac gauss_newton 12.00 ms vs ASDL K-FAC 40.00 ms (both refreshed every 10 " \
        "steps): 0.30x -> MET" in text
    assert "RING kfac gauss_newton 12.00 ms vs ASDL K-FAC 40.00 ms: 0.30x -> MET" in text
    assert "RING kfac gauss_newton 12.00 ms vs AdamW 10.00 ms: 1.20x -> MET" in text
    assert "batch 64: RING kfac gauss_newton 0.600 ms vs ASDL K-FAC 2.000 ms: 0.30x" in text
    tables = S.tables(res)
    assert "| RING (kfac) | 30.00 | 3.00 | 6.00 | 1.000 | 40.0 | 40% | 1/2 |" in tables
    assert "| 2048 | 5.00 | 10.00 | 40.00 | 30.00 | 0.75 | 3.00 | 1.000 | 1/2 | 12.00 | 0.30 " \
        "| 1.20 | – | – |" in tables
    assert "2.00 (40.00 / 20.00)" in tables  # the JAX spread column
    path = S.write(res, tmp_path)
    md = path.read_text()
    assert "## Targets (issue #11)" in md
    if _has("matplotlib"):
        assert (tmp_path / "stepcost_widths.png").stat().st_size > 1000
        assert "![step time against width](stepcost_widths.png)" in md


def test_stepcost_width_target_not_checked_without_2048():
    from benchmarks import stepcost_report as S

    res = _synthetic_stepcost_res()
    res["widths"].pop(2048)
    assert any("d = 2048 not measured" in line and "not checked" in line
               for line in S.targets(res))


def test_kfac_layers_factored_form_at_batch_size():
    pytest.importorskip("grng_core")
    from benchmarks.stepcost_setup import SIZES, factored_note, kfac_layers

    at128 = kfac_layers(SIZES, 128)
    assert [(r["layer"], r["d_in_ext"], r["factored"]) for r in at128] == [
        ("784->1024", 785, True), ("1024->256", 1025, True), ("256->10", 257, False)]
    assert not any(r["factored"] for r in kfac_layers(SIZES, 1024))
    assert factored_note(at128, True) == "784->1024 factored, 1024->256 factored, 256->10 dense"
    assert "does not apply" in factored_note(at128, False)


def test_hand_written_jax_ring_matches_grng_jax():
    """The step-cost JAX reference is the same math as grng_jax.ring's gauss_newton form."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    grng_jax = pytest.importorskip("grng_jax")
    import optax

    from benchmarks import stepcost_jaxref as ref
    from benchmarks.losses import jax_xent
    from benchmarks.models import jax_mlp_apply, mlp, torch_mlp_to_jax
    from benchmarks.stepcost_torch import gauss_newton_form

    torch.manual_seed(0)
    p0 = torch_mlp_to_jax(mlp((12, 9, 4), "relu"))
    rng = np.random.default_rng(0)
    batch = (jax.numpy.asarray(rng.standard_normal((16, 12)), "float32"),
             jax.numpy.asarray(rng.integers(0, 4, 16)))
    hp = ref.RefHyper(0.05, 0.05, 0.1, 0.9, 0.95, 3, "relu")
    tx = grng_jax.ring(0.05, rho=0.05, damping=0.1, structure="kfac", momentum=0.9,
                       curvature_every=3, inverse_every=3, ema_decay=0.95, kl_clip=float("inf"),
                       refresh_warmup=0, **gauss_newton_form())

    def loss(p, bt):
        return jax_xent(jax_mlp_apply(p, bt[0], "relu"), bt[1])

    @jax.jit
    def gstep(p, s, bt):
        u, s = tx.update(jax.grad(loss)(p, bt), s, p, loss_fn=loss, batch=bt)
        return optax.apply_updates(p, u), s

    step = jax.jit(ref.make_step(hp))
    fresh, plain = (jax.jit(f) for f in ref.make_host_steps(hp))
    pa, sa, pb, sb, pc, sc = p0, ref.init(p0), p0, tx.init(p0), p0, ref.init(p0)
    with jax.default_matmul_precision("highest"):  # no TF32 on a GPU
        for t in range(7):
            pa, sa, _ = step(pa, sa, batch)
            pb, sb = gstep(pb, sb, batch)
            pc, sc, _ = (fresh if t % 3 == 0 else plain)(pc, sc, batch)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(p) for p in (pa, pb, pc))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_stepcost_tiny_run_writes_its_report(tmp_path, monkeypatch):
    pytest.importorskip("grng_torch")
    from benchmarks.stepcost import main

    # main sets these (setdefault) and one torch thread: put them back afterwards
    for var in ("JAX_PLATFORMS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--batches", "16", "--widths", "16", "32", "--only", "ring",
                   "--no-jax", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    md = (tmp_path / "stepcost.md").read_text()
    assert "## Targets (issue #11)" in md and "width sweep" in md
    assert "torch threads 1" in md
    assert "| RING (kfac) |" in md and "default suite's digits MLP 64-128-64-10" in md


# ---------------------------------------------------------------------------------------------
# data and tasks


def test_data_splits_are_fixed_and_disjoint():
    from benchmarks import data as D

    a, b = D.digits(), D.digits()
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    n = len(a.x_train) + len(a.x_valid) + len(a.x_test)
    assert n == 1797
    lr = D.ill_conditioned_logreg(n=600, d=20, cond=1e4)
    ev = np.linalg.eigvalsh(np.cov(lr.x_train.T))
    assert ev.max() / ev.min() > 1e3  # ill-conditioned inputs
    assert 0.5 < lr.meta["bayes_accuracy"] <= 1.0


def test_char_corpus_is_real_text_available_offline():
    from benchmarks import data as D

    c = D.char_corpus()
    assert len(c.train) > 30_000 and c.n_classes == len(c.vocab)
    x, y = c.windows(c.train, 16, 4, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 16)
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    text = "".join(c.vocab[i] for i in c.train[:2000])
    assert text.count(" ") > 100  # prose, not noise


def test_bits_per_char_metric():
    from benchmarks.tasks import Task

    t = Task("x", "x", None, 1, 1, "bpc", 3.0, {})
    logits = np.zeros((4, 8))  # uniform over 8 symbols: 3 bits
    assert t.metric_from_logits(logits, np.arange(4)) == pytest.approx(3.0)
    assert t.reached(2.9) and not t.reached(3.1) and not t.reached(math.nan)


# ---------------------------------------------------------------------------------------------
# end to end


def test_tiny_run_writes_a_report(tmp_path, capsys):
    import json

    from benchmarks.__main__ import main

    ring = _has("grng_torch")
    opts = ["sgd", "adamw"] + (["ring", "ring_gn"] if ring else [])
    rc = main(["--quick", "--optimizers", *opts, "--epochs", "1", "--subset", "256",
               "--seeds", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    report = (tmp_path / "report.md").read_text()
    assert "| optimizer | selected | test acc |" in report and "| mean ‖g‖ (train) |" in report
    assert "| AdamW |" in report and "| SGD (momentum) |" in report
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["opt"] for r in runs} == set(opts)
    for r in runs:  # one minibatch gradient norm per step, and their mean
        assert len(r["grad_norms"]) == r["steps"] > 0
        assert math.isfinite(r["mean_grad_norm"]) and r["mean_grad_norm"] > 0
    if _has("matplotlib"):
        assert (tmp_path / "digits_mlp.png").stat().st_size > 1000
        assert (tmp_path / "digits_mlp_grad_norm.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| AdamW |" in out  # the table is printed at the end
    if ring:
        assert "| RING (kfac, adaptive_damping) |" in report
        assert "| RING (kfac, gauss_newton) |" in report
        verdict = [line for line in report.splitlines() if line.startswith("- RING (kfac): ")]
        assert len(verdict) == 2  # in the summary and in the task's targets
        assert ("reached the target first" in verdict[0]
                or "neither form reached the target" in verdict[0])
        assert verdict[0] in out


def test_quick_preset_runs_both_ring_forms_with_their_constraint():
    from benchmarks.optimizers import select_specs
    from benchmarks.tasks import make_task

    task = make_task("digits_mlp", subset=64)
    specs = {s.key: s for s in select_specs("quick")}
    assert specs["ring"].base["form"] == "adaptive_damping"
    assert specs["ring_gn"].base["form"] == "gauss_newton"
    assert specs["ring"].label_for(task) == "RING (kfac, adaptive_damping)"
    assert specs["ring_gn"].label_for(task) == "RING (kfac, gauss_newton)"
    full = {s.key: s for s in select_specs("full")}
    for key in ("ring_woodbury", "ring_diagonal", "ring_chol", "grng_jax_ring"):
        assert full[key].base["form"] == "adaptive_damping"
        assert full[key + "_gn"].base["form"] == "gauss_newton"
    assert full["rkalman_woodbury"].label_for(task) == "R-Kalman (woodbury)"
    # gauss_newton needs rho * damping <= 1; adaptive_damping has no bound
    ad, gn = specs["ring"], specs["ring_gn"]
    ad.base, gn.base = dict(ad.base, rho=1.0), dict(gn.base, rho=1.0)
    ad_grid, gn_grid = ad.sweep_grid("default", task), gn.sweep_grid("default", task)
    assert len(ad_grid) == 9 and any(h["rho"] * h["damping"] > 1 for h in ad_grid)
    assert gn_grid and all(h["rho"] * h["damping"] <= 1 for h in gn_grid)
    assert len(gn_grid) < len(ad_grid)


def _form_rows(ad_ttt, gn_ttt, ad_stt, gn_stt):
    from benchmarks.hyperparams import GN_SUFFIX

    runs = []
    for key, form, ttt, stt in (("ring", "adaptive_damping", ad_ttt, ad_stt),
                                ("ring" + GN_SUFFIX, "gauss_newton", gn_ttt, gn_stt)):
        for seed, (t, st) in enumerate(zip(ttt, stt)):
            r = _run(key, seed, 0.96, t, 0.01, label=f"RING (kfac, {form})",
                     hp={"lr": 0.1, "form": form})
            r.steps_to_target = st
            runs.append(r)
    return R.summary_rows(runs)


def test_ring_form_comparison_lines():
    from benchmarks.ring_forms import ring_form_lines
    from benchmarks.tasks import make_task

    task = make_task("digits_mlp", subset=64)
    line, = ring_form_lines(_form_rows([1.0, 1.2], [1.5, 1.7], [50, 60], [40, 50]), task)
    assert line.startswith("- RING (kfac): **adaptive_damping reached the target first** "
                           "(test accuracy >= 0.95): 1.10 s / 55 steps (2/2 seeds) vs "
                           "gauss_newton 1.60 s / 45 steps (2/2 seeds): 0.50 s sooner "
                           "(0.69x the time), 10 steps later")
    # a form that reaches the target on more seeds is first
    line, = ring_form_lines(_form_rows([math.nan, 1.0], [2.0, 2.2], [math.nan, 50],
                                       [90, 100]), task)
    assert "**gauss_newton reached the target first**" in line and "2/2 seeds" in line
    assert "on more seeds" in line and "(1/2 seeds)" in line
    line, = ring_form_lines(_form_rows([1.0], [math.nan], [50], [math.nan]), task)
    assert "**adaptive_damping reached the target first**" in line and "never did" in line
    line, = ring_form_lines(_form_rows([math.nan], [math.nan], [math.nan], [math.nan]), task)
    assert "**neither form reached the target**" in line
    rows = [r for r in _form_rows([1.0], [1.2], [50], [60]) if r["opt"] == "ring"]
    assert "only form adaptive_damping ran" in ring_form_lines(rows, task)[0]


@pytest.mark.parametrize("key,mods", [
    ("asdl_kfac", ("asdl",)), ("sophiah", ("pytorch_optimizer",)),
    ("sam", ("pytorch_optimizer",)), ("ivon", ("ivon",)),
])
def test_peer_runs_one_epoch_when_installed(key, mods):
    for m in mods:
        pytest.importorskip(m)
    from benchmarks.harness import run_one
    from benchmarks.optimizers import all_specs
    from benchmarks.tasks import make_task

    task = make_task("digits_mlp", subset=256)
    spec = next(s for s in all_specs() if s.key == key)
    r = run_one(task, spec, spec.base, 0, 1, math.nan)
    assert r.status == "ok", r.status
    assert r.steps == task.n_steps_per_epoch() and math.isfinite(r.grad_norm)
    assert len(r.grad_norms) == r.steps and all(math.isfinite(g) for g in r.grad_norms)


# ---------------------------------------------------------------------------------------------
# structure: benchmarks/ is a run-from-the-repository tool, small modules, no import cycles

REPO = Path(__file__).resolve().parent.parent


def _check_structure_module():
    name = "_grng_check_structure"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "check_structure.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look the module up while the file runs
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_benchmarks_have_no_import_cycles_and_no_oversized_code():
    rep = _check_structure_module().check(REPO, ("benchmarks",))
    assert rep.size_folders == ("benchmarks",) and rep.n_files > 20
    assert rep.ok, "\n".join(rep.sizes + rep.cycles)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_check_structure_finds_cycles_and_oversized_code(tmp_path):
    cs = _check_structure_module()
    _write(tmp_path, "benchmarks/__init__.py", "")
    _write(tmp_path, "benchmarks/a.py", "from benchmarks import b\nx = 1\n")
    _write(tmp_path, "benchmarks/b.py", "def f():\n    from benchmarks.a import x\n    return x\n")
    # a package __init__ importing its submodules: a cycle only where one imports the __init__
    _write(tmp_path, "grng_core/__init__.py",
           "from grng_core.sub import Y\nfrom .sub2 import Z\nVERSION = 1\n")
    _write(tmp_path, "grng_core/helper.py", "H = 1\n")
    _write(tmp_path, "grng_core/sub.py", "from grng_core import helper\nY = helper.H\n")
    _write(tmp_path, "grng_core/sub2.py", "from . import VERSION\nZ = VERSION\n")
    _write(tmp_path, "adapters/grng_torch/__init__.py", "from .optim import Opt\n")
    _write(tmp_path, "adapters/grng_torch/optim.py", "import grng_core.helper\nOpt = 1\n")
    _write(tmp_path, "benchmarks/big.py", "x = 1\n" * 401)
    _write(tmp_path, "benchmarks/long.py",
           "class K:\n    def m(self):\n" + "        pass\n" * 60 + "\n\ndef ok():\n    pass\n")
    _write(tmp_path, "tests/__init__.py", "")
    _write(tmp_path, "tests/test_long.py", "def test_x():\n" + "    pass\n" * 100)
    rep = cs.check(tmp_path)
    assert not rep.ok
    assert rep.sizes == ["benchmarks/big.py: file has 401 lines (max 400)",
                         "benchmarks/long.py:2: function K.m has 61 lines (max 60)"]
    firsts = sorted(c.splitlines()[0] for c in rep.cycles)
    assert firsts == ["import cycle among 2 modules: benchmarks.a, benchmarks.b",
                      "import cycle among 2 modules: grng_core, grng_core.sub2"]
    assert "benchmarks.a (benchmarks/a.py:1) -> benchmarks.b (benchmarks/b.py:2) -> " \
           "benchmarks.a" in "\n".join(rep.cycles)
    only = cs.check(tmp_path, ("grng_core",))
    assert only.sizes == [] and len(only.cycles) == 1 and "grng_core.sub2" in only.cycles[0]


# ---------------------------------------------------------------------------------------------
# packaging and command lines


def test_benchmarks_are_not_installed_with_grng():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    st = cfg["tool"]["setuptools"]
    assert not [p for p in st["packages"] if p.split(".")[0] == "benchmarks"]
    assert "benchmarks" not in st.get("package-dir", {})
    scripts = cfg["project"].get("scripts", {})
    assert not [k for k, v in scripts.items() if v.startswith("benchmarks")]


@pytest.mark.parametrize("module", ["benchmarks", "benchmarks.stepcost"])
def test_command_line_help_from_the_repository_root(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {module}")


def test_inverse_cost_measures_every_method():
    pytest.importorskip("torch")
    from benchmarks.inverse_cost import METHODS, measure

    rows = measure(17, 8, 1)
    assert [m for m, _, _ in rows] == list(METHODS)
    assert all(s > 0 and err < 1e-3 for _, s, err in rows)


def test_step_spread_takes_each_positions_least_disturbed_call(monkeypatch):
    """A one-off slow call (a disturbed window) does not count as a step's cost; a position
    that is slow on every call does."""
    from benchmarks import stepcost_jax as J

    clock = {"t": 0.0, "n": 0}
    monkeypatch.setattr(J.time, "perf_counter", lambda: clock["t"])

    def run(cost):
        def one():
            clock["t"] += cost(clock["n"])
            clock["n"] += 1
        clock.update(t=0.0, n=0)
        return J.step_spread(one, lambda: clock["n"], 2 * J.REFRESH_EVERY, windows=3)

    # refresh steps (position 0) cost 5, the rest 1; call 13 alone is disturbed (10)
    out = run(lambda n: 5.0 if n % J.REFRESH_EVERY == 0 else (10.0 if n == 13 else 1.0))
    assert out["spread"] == 1.0 and out["max_plain_raw"] == 10.0
    assert len(out["step_times"]) == 60
    # position 3 costs 2 on every call: the spread shows it
    out = run(lambda n: 5.0 if n % J.REFRESH_EVERY == 0 else (2.0 if n % J.REFRESH_EVERY == 3
                                                               else 1.0))
    assert out["spread"] == 2.0 and out["max_plain"] == 2.0 and out["median"] == 1.0


def test_eigh_floor_reads_the_default_forms_own_factors():
    """The floor times the eigendecompositions of the optimizer's own EMA factors (both
    factors of every K-FAC layer), and is None for a form that keeps inverses."""
    import grng_torch
    import torch

    from benchmarks.stepcost_eigh import eigh_floor

    def run(**kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        opt = grng_torch.RING(model.parameters(), model=model, **kw)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

        class S:
            pass
        s = S()
        s.opt = opt
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return eigh_floor(s, repeats=1, every=10)

    floor = run()
    assert floor["sizes"] == [7, 5, 6, 3]  # A (d_in + 1) and S (d_out) of both layers
    assert 0 < floor["seconds"] == floor["per_refresh"] / 10
    assert run(form="gauss_newton", rho=0.05) is None


@pytest.mark.skipif(not _has("torch"), reason="needs torch")
def test_settings_probe_prints_one_line_per_setting_and_seed(capsys):
    from benchmarks import settings_probe

    settings_probe.main(["digits_mlp", '{"adamw": {"_spec": "adamw", "lr": 0.005, '
                         '"weight_decay": 0.0}}', "--seeds", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adamw") and " ok " in lines[0], lines
    reached = lines[0].split("steps to target ")[1].split()[0]
    assert reached != "nan" and int(float(reached)) > 0  # AdamW reaches digits' 0.95
