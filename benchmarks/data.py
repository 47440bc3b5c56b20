"""Data sets for the benchmark tasks, all available offline on a fresh machine.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes). It ships
  inside the scikit-learn wheel, so no download is needed.
- ``logreg``: an ill-conditioned binary logistic regression, generated: Gaussian features whose
  scales span ``cond ** 0.5`` (so the input covariance has condition number ``cond``), labels
  drawn from a logistic model with a planted weight vector.
- ``text``: a character-level corpus. The default is the text of the Python Language Reference
  and library "topics" that CPython ships in ``pydoc_data.topics`` (the text ``help()`` shows,
  about 465k characters of real English technical prose, part of every CPython install). If a
  stripped Python lacks it, the reStructuredText descriptions of scikit-learn's bundled data sets
  (``sklearn/datasets/descr/*.rst``, about 43k characters) are used instead; the report names the
  corpus used.

Every split is fixed (it depends on ``split_seed`` only, never on the run's seed), so runs with
different seeds see the same train / validation / test examples.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Split:
    """Arrays of one data set: inputs ``x`` and integer targets ``y`` for each split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    meta: dict = field(default_factory=dict)

    def subset(self, n_train: int | None) -> Split:
        """The first ``n_train`` training examples (the split order is already shuffled)."""
        if n_train is None or n_train >= len(self.x_train):
            return self
        return Split(self.x_train[:n_train], self.y_train[:n_train], self.x_valid, self.y_valid,
                     self.x_test, self.y_test, self.n_classes, dict(self.meta))


def _three_way(n: int, rng: np.random.Generator, valid: float, test: float):
    perm = rng.permutation(n)
    n_test = int(round(test * n))
    n_valid = int(round(valid * n))
    return perm[n_test + n_valid:], perm[n_test:n_test + n_valid], perm[:n_test]


def digits(image: bool = False, split_seed: int = 0, size: int = 8) -> Split:
    """scikit-learn digits, pixels scaled to [0, 1]; 64-dim vectors or (1, size, size) images
    (``size`` a multiple of 8: each pixel repeated, nearest-neighbour upsampling).

    Split 70 / 10 / 20 (train / validation / test).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    if image:
        x = x.reshape(-1, 1, 8, 8)
        if size != 8:
            if size % 8:
                raise ValueError(f"digits image size {size} is not a multiple of 8")
            x = np.kron(x, np.ones((1, 1, size // 8, size // 8), np.float32))
    tr, va, te = _three_way(len(x), np.random.default_rng(split_seed), 0.1, 0.2)
    return Split(x[tr], y[tr], x[va], y[va], x[te], y[te], 10,
                 {"name": "sklearn digits", "n": len(x)})


def ill_conditioned_logreg(n: int = 6000, d: int = 100, cond: float = 1e4,
                           split_seed: int = 0) -> Split:
    """Binary logistic regression with input covariance of condition number ``cond``.

    Features x = z * s with z ~ N(0, I) and s_j spaced geometrically in [cond^-1/2, 1], rotated by
    a fixed random orthogonal matrix so that no coordinate-wise method sees the axes. Labels are
    drawn from sigmoid(x . w*), with w* chosen so that every direction matters (w*_j ~ 1/s_j,
    scaled to a logit standard deviation of 4). Split 70 / 10 / 20.
    """
    rng = np.random.default_rng(1000 + split_seed)
    s = np.geomspace(1.0, cond ** -0.5, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    z = rng.standard_normal((n, d))
    x = (z * s) @ q.T
    w = (rng.standard_normal(d) / s) @ q.T
    logits = x @ w
    w *= 4.0 / logits.std()
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    y = (rng.random(n) < p).astype(np.int64)
    bayes = float(np.mean((p > 0.5) == y))
    x = x.astype(np.float32)
    tr, va, te = _three_way(n, rng, 0.1, 0.2)
    return Split(x[tr], y[tr], x[va], y[va], x[te], y[te], 2,
                 {"name": f"ill-conditioned logistic regression (d={d}, cond={cond:g})",
                  "bayes_accuracy": bayes, "n": n})


# ---------------------------------------------------------------------------------------------
# Character-level text

_PRINTABLE = "".join(c for c in string.printable if c not in "\x0b\x0c\r")


def load_corpus() -> tuple[str, str]:
    """(text, description) of the real text corpus available offline; see the module doc."""
    try:
        from pydoc_data import topics

        text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
        if len(text) > 100_000:
            return text, ("CPython's pydoc_data.topics (the Python Language Reference text "
                          "shipped with every CPython install)")
    except ImportError:  # pragma: no cover - stripped Python builds
        pass
    from pathlib import Path

    import sklearn

    descr = Path(sklearn.__file__).parent / "datasets" / "descr"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst")))
    return text, "scikit-learn's bundled data-set descriptions (sklearn/datasets/descr/*.rst)"


@dataclass
class CharCorpus:
    """Character-level corpus: integer-coded train / validation / test streams."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: str
    description: str

    @property
    def n_classes(self) -> int:
        return len(self.vocab)

    def windows(self, stream: np.ndarray, seq_len: int, n: int, rng: np.random.Generator):
        """``n`` random windows: inputs (n, seq_len) and next-character targets (n, seq_len)."""
        starts = rng.integers(0, len(stream) - seq_len - 1, size=n)
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        w = stream[idx]
        return w[:, :-1], w[:, 1:]

    def eval_windows(self, which: str, seq_len: int, n: int):
        """Fixed, non-overlapping evaluation windows of the validation or test stream."""
        stream = self.valid if which == "valid" else self.test
        n = min(n, (len(stream) - 1) // seq_len)
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        w = stream[idx]
        return w[:, :-1], w[:, 1:]


def char_corpus(max_chars: int | None = None) -> CharCorpus:
    """The corpus, non-printable characters mapped to '?', split 90 / 5 / 5 by position."""
    text, desc = load_corpus()
    if max_chars is not None:
        text = text[:max_chars]
    vocab = _PRINTABLE
    table = {c: i for i, c in enumerate(vocab)}
    unk = table["?"]
    codes = np.fromiter((table.get(c, unk) for c in text), dtype=np.int64, count=len(text))
    n = len(codes)
    a, b = int(0.9 * n), int(0.95 * n)
    return CharCorpus(codes[:a], codes[a:b], codes[b:], vocab,
                      f"{desc}; {n:,} characters, vocabulary {len(vocab)}")
