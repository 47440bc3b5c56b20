"""grng_torch warns at the first step when a K-FAC layer's gradient is not its own calls'
c·sᵀa/B + α·W (ALGORITHMS.md §2.1 "This project"): a weight tied by a plain function call
(h @ emb.weight.T, F.linear(h, fc.weight)) keeps K-FAC from its module's calls only, which a
module-level tie (detected from the modules, put on the diagonal) does not. Ordinary loops
stay quiet: an L2 term, global clipping, accumulation, bf16 autocast, the zoo."""

import warnings

import grng_torch
import pytest
import torch
from torch import nn

from tests.torch.zoo import ZOO

V, D, B, T = 30, 8, 6, 5
FLAG = "is not the product of the layer's own calls' statistics"


class LM(nn.Module):
    def __init__(self, tie: str, padding_idx=None):
        super().__init__()
        self.tie = tie
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.hidden, self.head = nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, ids):
        h = torch.tanh(self.hidden(self.emb(ids)))
        if self.tie == "embedding":
            return h @ self.emb.weight.T
        if self.tie == "linear":  # the hidden layer's weight used again, functionally
            h = h + 0.5 * nn.functional.linear(h, self.hidden.weight)
        return self.head(h)


def _flags(model, loss_of, name="RING", closure_free=False, clip=None, micro=1, **kw):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    ids[:, -2:] = 0  # padding at the end (the padding_idx runs' token)
    opt = getattr(grng_torch, name)(model.parameters(), model=model, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            def closure():
                opt.zero_grad()
                total = 0.0
                for chunk in ids.chunk(micro):
                    loss = loss_of(model, chunk) / micro
                    loss.backward()
                    total += float(loss)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                return torch.tensor(total)
            if closure_free:
                closure()
                opt.step()
            else:
                opt.step(closure)
    return [str(w.message) for w in rec if FLAG in str(w.message)]


def _ce(model, ids):
    return nn.functional.cross_entropy(model(ids).reshape(-1, V), ids.reshape(-1))


@pytest.mark.parametrize("name", ["RING", "RENG", "RKalman"])
@pytest.mark.parametrize("tie,layer,pad", [("embedding", "'emb'", None),
                                           ("embedding", "'emb'", 0), ("linear", "'hidden'", 0)])
def test_a_functional_tie_is_named_once(name, tie, layer, pad):
    torch.manual_seed(0)
    got = _flags(LM(tie, pad), _ce, name)
    assert len(got) == 1 and layer in got[0] and "structure='diagonal'" in got[0]


@pytest.mark.parametrize("setting", ["plain", "l2", "l2 on weights only", "clip closure-free",
                                     "micro-batches", "bf16 autocast", "mc fisher",
                                     "padding_idx", "frozen weight, bias trains"])
def test_ordinary_loops_are_quiet(setting):
    """padding_idx: torch gives the padding row no gradient while the rows hold its tokens;
    the check leaves those rows out (the statistics keep them)."""
    torch.manual_seed(0)
    model = LM("none", padding_idx=0 if setting == "padding_idx" else None)

    if setting == "frozen weight, bias trains":
        model.hidden.weight.requires_grad_(False)

    def l2(m, ids):
        return _ce(m, ids) + 1e-2 * sum((p ** 2).sum() for p in m.parameters())

    def l2_weights(m, ids):  # the usual "no decay on biases"
        return _ce(m, ids) + 1e-2 * sum((p ** 2).sum() for n, p in m.named_parameters()
                                        if n.endswith("weight"))

    def bf16(m, ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _ce(m, ids)
    kw = {"plain": {}, "l2": {}, "clip closure-free": {"closure_free": True, "clip": 0.1},
          "micro-batches": {"micro": 2}, "bf16 autocast": {},
          "mc fisher": {"fisher": "mc", "loss_fn": nn.CrossEntropyLoss()},
          "padding_idx": {}, "l2 on weights only": {},
          "frozen weight, bias trains": {}}[setting]
    loss_of = {"l2": l2, "bf16 autocast": bf16, "l2 on weights only": l2_weights}.get(setting,
                                                                                     _ce)
    assert _flags(model, loss_of, **kw) == []


@pytest.mark.parametrize("zoo", sorted(ZOO))
def test_the_zoo_is_quiet(zoo):
    z = ZOO[zoo]()
    opt = grng_torch.RING(z.model.parameters(), model=z.model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        z.step(opt, 0)
    assert not [w for w in rec if FLAG in str(w.message)]
