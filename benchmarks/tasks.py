"""Benchmark tasks: model, data, batches, loss, test metric and target.

A task hands the harness numpy batches; the harness turns them into torch (or JAX) arrays once
per run so that conversions are not timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from benchmarks import data as D

TASK_NAMES = ("digits_mlp", "digits_cnn", "resnet_bn", "logreg", "char_lm", "gpt2_char")
#: One vision and one language task of the paper's kinds (issue #15), in the default suite.
REAL_TASKS = ("resnet_bn", "gpt2_char")


@dataclass
class Task:
    name: str
    title: str
    make_model: Callable[[int], object]  # seed -> torch nn.Module
    batch_size: int
    epochs: int  # default run's epochs; presets may change them
    metric: str  # "accuracy" (higher is better) or "bpc" (bits per character, lower is better)
    target: float  # target test metric for the time-to-target measurement
    structures: dict  # GRNG optimizer -> structure that suits this model
    arrays: object = None  # data.Split or data.CharCorpus
    steps_per_epoch: int | None = None  # for streams (char LM): steps that make an "epoch"
    seq_len: int = 0
    evals_per_epoch: int = 2
    jax_model: str | None = None  # "mlp" when a JAX twin exists
    mlp_sizes: tuple = ()
    activation: str = "tanh"
    sweep: dict = field(default_factory=dict)  # overrides of the sweep grid's multipliers
    seeds: int | None = None  # a preset's seed count for this task (None: the suite's)
    rows: tuple | None = None  # a preset's optimizer rows for this task (None: all selected)
    meta: dict = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def better(self, a: float, b: float) -> bool:
        """True when metric value a is better than b (NaN is never better)."""
        if not np.isfinite(a):
            return False
        if not np.isfinite(b):
            return True
        return a > b if self.higher_is_better else a < b

    def reached(self, value: float) -> bool:
        if not np.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target

    @property
    def n_train(self) -> int:
        if isinstance(self.arrays, D.CharCorpus):
            return self.steps_per_epoch * self.batch_size
        return len(self.arrays.x_train)

    def n_steps_per_epoch(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return len(self.arrays.x_train) // self.batch_size  # drop the last partial batch

    def epoch_batches(self, rng: np.random.Generator):
        """Numpy (x, y) minibatches of one epoch, shuffled by rng."""
        a = self.arrays
        if isinstance(a, D.CharCorpus):
            for _ in range(self.steps_per_epoch):
                yield a.windows(a.train, self.seq_len, self.batch_size, rng)
            return
        perm = rng.permutation(len(a.x_train))
        b = self.batch_size
        for i in range(self.n_steps_per_epoch()):
            idx = perm[i * b:(i + 1) * b]
            yield a.x_train[idx], a.y_train[idx]

    def eval_set(self, which: str):
        """Numpy (x, y) of the validation or test split (fixed windows for the char LM)."""
        a = self.arrays
        if isinstance(a, D.CharCorpus):
            return a.eval_windows(which, self.seq_len, 96)
        return (a.x_valid, a.y_valid) if which == "valid" else (a.x_test, a.y_test)

    def grad_norm_set(self):
        """The training examples over which the final gradient norm is measured."""
        a = self.arrays
        if isinstance(a, D.CharCorpus):
            return a.windows(a.train, self.seq_len, 128, np.random.default_rng(123))
        return a.x_train, a.y_train

    def metric_from_logits(self, logits: np.ndarray, y: np.ndarray) -> float:
        """Accuracy, or bits per character from the mean cross-entropy."""
        y = y.reshape(-1)
        if self.metric == "accuracy":
            return float(np.mean(np.argmax(logits, axis=-1) == y))
        z = logits - logits.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return float(-np.mean(logp[np.arange(len(y)), y]) / np.log(2.0))


_KFAC = {"reng": "kfac", "ring": "kfac", "rkalman": "kfac", "ngd": "kfac"}


def _seeded(build):
    def make(seed):
        import torch

        torch.manual_seed(seed)
        return build()
    return make


def make_task(name: str, subset: int | None = None) -> Task:
    """The named task with its data loaded (``subset``: first n training examples only)."""
    if name in ("char_lm", "gpt2_char"):
        return _language_task(name, subset)
    from benchmarks import models as M
    from benchmarks import models_real as MR

    if name == "digits_mlp":
        sizes = (64, 128, 64, 10)
        return Task(name, "digits MLP 64-128-64-10 (tanh)", _seeded(lambda: M.mlp(sizes)),
                    batch_size=64, epochs=15, metric="accuracy", target=0.95,
                    structures=_KFAC, arrays=D.digits().subset(subset), evals_per_epoch=4,
                    jax_model="mlp", mlp_sizes=sizes,
                    meta={"data": "scikit-learn digits, 70/10/20 split"})
    if name == "digits_cnn":
        return Task(name, "digits CNN conv8-conv16-pool-dense", _seeded(M.small_cnn),
                    batch_size=64, epochs=15, metric="accuracy", target=0.95,
                    structures=_KFAC, arrays=D.digits(image=True).subset(subset),
                    evals_per_epoch=2, meta={"data": "scikit-learn digits as 1x8x8 images"})
    if name == "resnet_bn":
        return Task(name, "ResNet-style CNN with BatchNorm (digits 16x16)",
                    _seeded(lambda: MR.ResNetBN(16)), batch_size=64, epochs=5,
                    metric="accuracy", target=0.95, structures=_KFAC,
                    arrays=D.digits(image=True, size=16).subset(subset), evals_per_epoch=4,
                    meta={"data": "scikit-learn digits as 1x16x16 images (pixels repeated)"})
    if name == "logreg":
        arr = D.ill_conditioned_logreg().subset(subset)
        d = arr.x_train.shape[1]
        bayes = arr.meta["bayes_accuracy"]
        return Task(name, f"ill-conditioned logistic regression (d={d}, cond 1e4)",
                    _seeded(lambda: M.logistic_regression(d)), batch_size=128, epochs=15,
                    metric="accuracy", target=round(bayes - 0.03, 3),
                    structures={k: "woodbury" for k in _KFAC},
                    arrays=arr, evals_per_epoch=2, jax_model="mlp", mlp_sizes=(d, 2),
                    meta={"data": arr.meta["name"], "bayes_accuracy": bayes})
    raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASK_NAMES)}")


def _language_task(name: str, subset: int | None) -> Task:
    """The char-level LMs on the corpus: windows of 64 characters; an "epoch" is 50 steps
    (5 with ``subset``); the sweep is over lr only (each run is ~100x a digits run)."""
    from benchmarks import models as M
    from benchmarks import models_real as MR

    corpus = D.char_corpus()
    v = corpus.n_classes
    common = dict(metric="bpc", structures=_KFAC, arrays=corpus, seq_len=64,
                  steps_per_epoch=50 if subset is None else 5, epochs=6,
                  sweep={"damping": (1.0,)}, meta={"data": corpus.description})
    if name == "char_lm":
        return Task(name, "char-level tiny transformer (2 layers, d=64)",
                    _seeded(lambda: M.TinyTransformer(v, d=64, layers=2, heads=4, seq_len=64)),
                    batch_size=32, target=3.0, evals_per_epoch=1, **common)
    return Task(name, "tiny GPT-2 char LM (transformers; 2 layers, d=64)",
                _seeded(lambda: MR.GPT2Char(v, d=64, layers=2, heads=4, seq_len=64)),
                batch_size=16, target=3.3, evals_per_epoch=5, **common)
