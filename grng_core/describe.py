"""A structure report: which structure and layer each parameter leaf is preconditioned with.

`describe(config, shapes, kfac_layers, ...)` builds a `StructureReport` from what any
backend knows (leaf shapes, the K-FAC layers' (weight, bias) positions); `describe_state`
reads the layers from an `OptState`. Adapters add names (module paths), reasons a weight is
on the diagonal (its layer type, tied, not reached by the loss) and the extra-damping
incidents (`grng_core.incidents`). `str(report)` is the table users read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

from grng_core.config import value_at
from grng_core.incidents import FactorIncident
from grng_core.state import OptState, Preconditioner, layouts

#: The widest name column of the table (longer names push their row's columns right).
NAME_WIDTH = 64
#: A reason longer than FOOTNOTE_CHARS on FOOTNOTE_ROWS rows or more is printed once, below.
FOOTNOTE_CHARS, FOOTNOTE_ROWS = 80, 3

#: A K-FAC layer whose curvature is below this share of the damping gets a note.
DOMINATED_BELOW = 1e-2

#: The reason given for a leaf the adapter reports as not trained.
FROZEN_LEAF = "frozen (requires_grad=False): not trained"


class LeafEntry(NamedTuple):
    """One parameter leaf: its name, shape, structure ("kfac", "diagonal", "woodbury"), the
    K-FAC layer it belongs to (None otherwise), why it is not under K-FAC, and whether it is
    trained (False: a frozen leaf the adapter was given, left out of `kfac_share`)."""

    name: str
    shape: tuple[int, ...]
    structure: str
    layer: str | None = None
    reason: str | None = None
    trained: bool = True

    @property
    def counted(self) -> bool:
        """Whether the leaf counts in the K-FAC share: not a frozen leaf off K-FAC (a frozen
        base model under LoRA adapters) — a frozen weight in a K-FAC layer (BitFit) counts."""
        return self.trained or self.structure == "kfac"


class StructureReport(NamedTuple):
    """entries: every leaf; kfac_share: the share of weight-matrix elements (leaves with ≥ 2
    axes) preconditioned by K-FAC; incidents: factors that needed extra damping; skipped:
    steps skipped as non-finite (None before the first step); no_warmup: the K-FAC layers seen
    to skip the refresh warm-up (enough rows a step, §2.1; where the adapter reports it)."""

    algorithm: str
    entries: tuple[LeafEntry, ...]
    kfac_share: float
    incidents: tuple[FactorIncident, ...] = ()
    skipped: int | None = None
    no_warmup: tuple[str, ...] = ()

    def matrices(self) -> list[LeafEntry]:
        return [e for e in self.entries if len(e.shape) >= 2]

    def __str__(self) -> str:
        left_out = [e for e in self.matrices() if not e.counted]
        share = (f"{self.kfac_share:.0%} of weight-matrix elements under K-FAC"
                 + (f" (of the trained ones: {len(left_out)} frozen matrices left out)"
                    if left_out else ""))
        skipped = "" if self.skipped is None else \
            f", {self.skipped} step{'' if self.skipped == 1 else 's'} skipped"
        lines = [f"{self.algorithm}: {len(self.entries)} parameter leaves, {share}{skipped}"]
        width = min(NAME_WIDTH, max((len(e.name) for e in self.entries), default=0))
        marks = self._footnotes()
        for e in self.entries:
            where = f"  layer {e.layer}" if e.layer else ""
            why = f"  [{marks[e.reason]}]" if e.reason in marks else \
                f"  ({e.reason})" if e.reason else ""
            lines.append(f"  {e.name:<{width}} {str(e.shape):<16} {e.structure:<9}{where}{why}")
        lines += [f"  [{k}] {reason}" for reason, k in marks.items()]
        for inc in self.incidents:
            lines.append(f"  {inc.kind}: factor {inc.factor} of {inc.layer}: "
                         f"{inc.refreshes} times, last extra damping {inc.extra_damping:.3g}")
        if self.no_warmup:
            lines.append("  refresh warm-up skipped (warmup_rows rows a step per factor "
                         f"dimension or more): {', '.join(self.no_warmup)}")
        return "\n".join(lines)

    def _footnotes(self) -> dict[str, int]:
        """A long reason shared by several leaves (not just a layer's weight and bias),
        numbered: the rows show its number, the text follows the table once."""
        seen = Counter(e.reason for e in self.entries if e.reason)
        long = [r for r in seen if seen[r] >= FOOTNOTE_ROWS and len(r) > FOOTNOTE_CHARS]
        return {r: k for k, r in enumerate(long, 1)}

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """IPython / Jupyter show the table (`opt.describe()` as a cell's last line)."""
        printer.text(str(self))


def mostly_diagonal(kfac_sizes: Sequence[int], other_sizes: Sequence[int]) -> float | None:
    """The adapters' warning criterion: the share of weight-matrix elements (sizes of the ≥ 2-axis
    leaves under K-FAC / not) off K-FAC when it is more than half (the complement of
    `kfac_share`: a large embedding or LSTM left diagonal counts by its size), else None."""
    off, total = sum(other_sizes), sum(kfac_sizes) + sum(other_sizes)
    return off / total if other_sizes and 2 * off > total else None


def kfac_share(entries: Sequence[LeafEntry]) -> float:
    """Elements of ≥ 2-axis leaves under K-FAC over all elements of ≥ 2-axis leaves, of the
    leaves that count (`LeafEntry.counted`)."""
    counted = [e for e in entries if len(e.shape) >= 2 and e.counted]
    total = sum(math.prod(e.shape) for e in counted)
    under = sum(math.prod(e.shape) for e in counted if e.structure == "kfac")
    return under / total if total else 0.0


def describe(algorithm: str, structure: str, shapes: Sequence[tuple[int, ...]],
             kfac_layers: Sequence[tuple[int, int | None]], names: Sequence[str] | None = None,
             layer_names: Mapping[int, str] | None = None,
             reasons: Mapping[int, str] | None = None, incidents=(),
             skipped: int | None = None, no_warmup: Sequence[str] = (),
             notes: Mapping[int, str] | None = None,
             frozen: Collection[int] = ()) -> StructureReport:
    """The report of one parameter container. structure: the configured one ("kfac" leaves
    outside `kfac_layers` run "diagonal"); kfac_layers: (weight, bias) positions; names /
    layer_names / reasons: per position (defaults: the position); reasons explain leaves off
    K-FAC, `notes` K-FAC leaves (e.g. factors no longer refreshed); `frozen`: positions of
    leaves that are not trained (reason `FROZEN_LEAF` off K-FAC; not in `kfac_share`)."""
    names = names or [str(i) for i in range(len(shapes))]
    layer_of = {}
    for w, b in kfac_layers:
        label = (layer_names or {}).get(w, names[w])
        layer_of[w] = label
        if b is not None:
            layer_of[b] = label
    fallback = "diagonal" if structure == "kfac" else structure
    frozen = set(frozen)
    why = dict(reasons or {})
    why.update({i: FROZEN_LEAF for i in frozen if not why.get(i, "").startswith("frozen")})
    entries = tuple(
        LeafEntry(names[i], tuple(shape), "kfac" if i in layer_of else fallback,
                  layer_of.get(i), ((notes or {}) if i in layer_of else why).get(i),
                  i not in frozen)
        for i, shape in enumerate(shapes))
    return StructureReport(algorithm, entries, kfac_share(entries), tuple(incidents), skipped,
                           tuple(no_warmup))


def algorithm_label(algorithm: str, form: str | None) -> str:
    """A report's title: RING's form where it is not the default one (§3.2)."""
    return algorithm if form in (None, "adaptive_damping") else f"{algorithm} ({form})"


def describe_state(algorithm: str, structure: str, state: OptState, shapes, config=None,
                   **kw) -> StructureReport:
    """`describe` with the K-FAC layers read from a state (and its skipped-step count);
    with the optimizer's `config`, K-FAC layers whose damping dominates get a note
    (`damping_notes`)."""
    pairs = [(L.weight, L.bias) for L in layouts(state)]
    kw.setdefault("skipped", int(state.skipped))
    if config is not None:
        kw["notes"] = {**damping_notes(state, config), **(kw.get("notes") or {})}
        algorithm = algorithm_label(algorithm, getattr(config, "form", None))
    return describe(algorithm, structure, shapes, pairs, **kw)


def damping_notes(state: OptState, config) -> dict[int, str]:
    """{leaf position: note} of the K-FAC layers (RENG, RING) whose curvature is far below the
    damping λ: the mean eigenvalue of A ⊗ S, (tr A / d_A)(tr S / d_S), under
    `DOMINATED_BELOW`·λ. Their damped factors are then about √λ-scaled identities (§2.1), so the
    step is about g/λ: a first-order step, short where the gradients are small (a block after
    ConvNeXt's layer scale of 1e-6). Reads the factors to the host: for reports, not a step."""
    if not isinstance(state.curvature, Preconditioner) or not state.curvature.kfac \
            or int(state.curvature_count) == 0:
        return {}
    damping = float(value_at(config.damping, state.step))
    out: dict[int, str] = {}
    for L in state.curvature.kfac:
        mean = _mean_eig(L.A) * _mean_eig(L.S)
        if not mean < DOMINATED_BELOW * damping:
            continue
        note = (f"damping-dominated: the curvature's mean eigenvalue {mean:.2g} is "
                f"{mean / damping:.1g} times the damping ({damping:g}): its step is about "
                "g/damping (its gradients are tiny: e.g. a layer behind a small scale, or "
                "attention's query and key projections at initialisation)")
        out.update({i: note for i in (L.layout.weight, L.layout.bias) if i is not None})
    return out


def _mean_eig(F) -> float:
    """tr(F)/d of a factor (an embedding's diagonal A is kept as its diagonal)."""
    from array_api_compat import array_namespace

    xp = array_namespace(F)
    diag = F if F.ndim == 1 else xp.linalg.diagonal(F)
    return float(xp.mean(diag))


def merge(reports: Sequence[StructureReport]) -> StructureReport:
    """One report over several param groups."""
    entries = tuple(e for r in reports for e in r.entries)
    skipped = [r.skipped for r in reports if r.skipped is not None]
    return StructureReport(reports[0].algorithm if reports else "", entries,
                           kfac_share(entries), tuple(i for r in reports for i in r.incidents),
                           sum(skipped) if skipped else None,
                           tuple(n for r in reports for n in r.no_warmup))
