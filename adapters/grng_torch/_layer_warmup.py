"""The K-FAC warm-up's per-layer decision on a step whose refresh is the warm-up's only
(ALGORITHMS.md §2.1, `grng_core.schedule.layer_warms`): `Collector.warms` / `warms_now`, whose
`self` is the collector."""

from __future__ import annotations

import torch

from grng_core import schedule


def layer_warms(self, i: int, x: torch.Tensor, output: torch.Tensor) -> bool:
    """On a step whose refresh is the warm-up's only, whether layer i keeps this model
    call's rows (`grng_core.schedule.layer_warms` on the rows of its first use in the call,
    `HookedLayer.call_rows`); `warms_now` decides for the step. Not under
    torch.distributed: there every layer takes it (`_step.plan`)."""
    decided = self.warming.setdefault(i, {})
    c = self._call_index()
    if c not in decided:
        layer, config = self.layers[i], self.warmup_only[i]
        rows = layer.call_rows(x, output)
        d_a = layer.d_in + (layer.bias is not None)
        decided[c] = schedule.layer_warms(config, rows, d_a, layer.d_out)
    return decided[c]


def layer_warms_now(self, i: int) -> bool:
    """Whether layer i takes this step's warm-up refresh: every model call of the batch
    decided so (their rows were all kept); an evaluation call's decision does not count.
    One that skips it is listed in `no_warmup` (describe())."""
    used = {c for c, _ in self.batch.used()}
    decided = [w for c, w in self.warming.get(i, {}).items() if c in used]
    if decided and not all(decided):
        self.no_warmup.add(i)
        return False
    return True
