"""The suite's plots, one pair of PNGs per task (matplotlib, Agg; means over seeds of the
selected settings): ``<task>.png``, training loss and test metric against steps and wall time,
and ``<task>_grad_norm.png``, the minibatch gradient norm ||g|| against steps and its mean per
epoch (the paper's Figure 1 diagnostic)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from benchmarks.run_result import RunResult, group_runs

GRNG_PREFIXES = ("reng", "ring", "rkalman", "ngd", "grng")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (the test
    extra has none: the report says so)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subplots(plt, rows: int, cols: int, size: tuple):
    """Figure and axes whose colour cycle has 20 distinct colours (more rows than tab10)."""
    tab20 = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(rows, cols, figsize=size)
    for ax in np.atleast_1d(axes).flat:
        ax.set_prop_cycle(color=list(tab20[0::2] + tab20[1::2]))
    return fig, axes


def _style(opt: str, label: str) -> dict:
    """GRNG rows solid, the others dashed."""
    style = "-" if opt.split("_")[0] in GRNG_PREFIXES else "--"
    return dict(label=label, linestyle=style, linewidth=1.4)


def _nanmean(rows) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns (step 0's loss)
        return np.nanmean(np.asarray(rows, dtype=float), axis=0)


def _runs_of(results: list[RunResult], task) -> list[RunResult]:
    return [r for r in results if r.task == task.name and r.history and r.status != "error"]


def plot_task(results: list[RunResult], task, path: Path) -> Path | None:
    """Training loss and test metric vs steps and vs wall time, mean over seeds."""
    plt = _pyplot()
    runs = _runs_of(results, task)
    if plt is None or not runs:
        return None
    fig, axes = _subplots(plt, 2, 2, (13, 9))
    mlabel = "test accuracy" if task.metric == "accuracy" else "test bits/char"
    for (_, opt), rs in group_runs(runs).items():
        n = min(len(r.history) for r in rs)
        if n < 2:
            continue
        steps = np.array([h["step"] for h in rs[0].history[:n]])
        tm = np.mean([[h["time"] for h in r.history[:n]] for r in rs], axis=0)
        loss = _nanmean([[h["loss"] for h in r.history[:n]] for r in rs])
        test = _nanmean([[h["test"] for h in r.history[:n]] for r in rs])
        kw = _style(opt, rs[0].label)
        axes[0, 0].plot(steps[1:], loss[1:], **kw)
        axes[0, 1].plot(tm[1:], loss[1:], **kw)
        axes[1, 0].plot(steps, test, **kw)
        axes[1, 1].plot(tm, test, **kw)
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
    for ax in axes[1]:
        ax.set_ylabel(mlabel)
        ax.axhline(task.target, color="grey", linewidth=0.8, linestyle=":")
        if task.metric == "accuracy":
            ax.set_ylim(max(0.0, task.target - 0.25), 1.0)
    for ax in axes[:, 0]:
        ax.set_xlabel("steps")
    for ax in axes[:, 1]:
        ax.set_xlabel("training wall time (s)")
    return _save(plt, fig, axes, f"{task.title}: mean over seeds (selected settings)", path)


def _smooth(v: np.ndarray, w: int) -> np.ndarray:
    """Trailing moving average over ``w`` steps (shorter at the start; nan left out)."""
    ok = np.isfinite(v)
    c = np.cumsum(np.insert(np.where(ok, v, 0.0), 0, 0.0))
    k = np.cumsum(np.insert(ok.astype(float), 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - w, 0)
    with np.errstate(all="ignore"):
        return (c[idx] - c[lo]) / (k[idx] - k[lo])


def plot_grad_norm(results: list[RunResult], task, path: Path) -> Path | None:
    """The minibatch gradient norm ||g|| of every step against steps (mean over seeds, moving
    average over one evaluation interval), and its mean per epoch against epochs."""
    plt = _pyplot()
    runs = [r for r in _runs_of(results, task) if r.grad_norms]
    if plt is None or not runs:
        return None
    spe = task.n_steps_per_epoch()
    w = max(1, spe // task.evals_per_epoch)
    fig, axes = _subplots(plt, 1, 2, (13, 5))
    for (_, opt), rs in group_runs(runs).items():
        n = min(len(r.grad_norms) for r in rs)
        if n < 1:
            continue
        g = _nanmean([r.grad_norms[:n] for r in rs])
        if not np.isfinite(g).any():
            continue
        kw = _style(opt, rs[0].label)
        axes[0].plot(np.arange(1, n + 1), _smooth(g, w), **kw)
        n_ep = n // spe
        if n_ep:
            per_epoch = _nanmean(g[:n_ep * spe].reshape(n_ep, spe).T)
            axes[1].plot(np.arange(1, n_ep + 1), per_epoch, marker="o", markersize=3, **kw)
    axes[0].set_xlabel("steps")
    axes[0].set_ylabel(f"minibatch ||g|| (moving average over {w} steps)")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("mean minibatch ||g|| over the epoch")
    for ax in axes:
        ax.set_yscale("log")
    return _save(plt, fig, np.asarray(axes), f"{task.title}: gradient norm during training "
                 "(mean over seeds, selected settings)", path)


def _save(plt, fig, axes, title: str, path: Path) -> Path:
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
