"""grng_torch reduces a convolution's unfolded patches as they arrive (`grng_core.InputGram`,
ALGORITHMS.md §2.1 "Input rows reduced early"): on a refreshing step of RENG, RING or NGD the
hook keeps aᵀa, Σa and the check's probes instead of B·H·W rows of C·k² values. The steps equal
those of the rows themselves (float64, against the optimizer with the reduction turned off),
the kept statistics are a fraction of the rows' bytes, and the first step's check still names
a convolution whose weight is used again outside its module."""

import warnings

import array_api_compat
import grng_torch
import pytest
import torch
from grng_torch import _layer_rows, _pass_stats
from grng_torch.layers import conv, find_layers
from torch import nn

import grng_core as gc
from grng_core.structures import input_gram

B = 6


class Net(nn.Module):
    """Convolutions with and without bias, strided and dilated, called twice (shared weights),
    and a linear head (whose rows, a view of its input, are kept as they are)."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.tie = tie
        self.c1 = nn.Conv2d(2, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 6, 3, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.c4 = nn.Conv1d(6, 4, 3, padding="same")
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c2(h[:, :5]) if not self.tie else h)  # c2 called twice
        if self.tie:  # c1's weight used again, functionally: not its module's call
            tied = nn.functional.conv2d(h[:, :2], self.c1.weight, padding=1)
            h = torch.cat([h[:, :5] + tied, h[:, 5:]], 1)
        h = torch.tanh(self.c3(h)).flatten(2)
        return self.head(torch.tanh(self.c4(h)).mean(-1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,),
                                                                                    generator=g)


def _train(name, reduce: bool, monkeypatch, steps=7, closure_free=False, **kw):
    torch.manual_seed(0)
    model = Net().double()
    x, y = _data()
    if not reduce:
        monkeypatch.setattr(_pass_stats, "gram_layers", lambda opt, gp: {})
    if kw.get("fisher") == "mc":
        kw["loss_fn"] = nn.CrossEntropyLoss()
    opt = getattr(grng_torch, name)(model.parameters(), model=model, lr=0.05, **kw)
    kept = []

    def closure():
        opt.zero_grad()
        loss = (kw.get("loss_fn") or nn.functional.cross_entropy)(model(x), y)
        kept.append({opt.collector.layers[i].label: list(c) for i, c in opt.collector.a.items()})
        loss.backward()
        return loss
    for _ in range(steps):
        if closure_free:
            closure()
            opt.step()
        else:
            opt.step(closure)
    monkeypatch.undo()
    return [p.detach().clone() for p in model.parameters()], kept


@pytest.mark.parametrize("name,kw", [("RING", {}), ("RING", {"form": "gauss_newton"}),
                                     ("RENG", {}), ("RENG", {"rho": 0.0})])
@pytest.mark.parametrize("chunk", [None, 1])
def test_steps_equal_those_of_the_rows(name, kw, chunk, monkeypatch):
    """chunk 1: every example's patches reduced on their own (`kept_input`'s slices)."""
    rows, kept_rows = _train(name, False, monkeypatch, curvature_every=2, inverse_every=2,
                             **kw)
    if chunk is not None:
        monkeypatch.setattr(_layer_rows, "CHUNK_BYTES", chunk)
    grams, kept = _train(name, True, monkeypatch, curvature_every=2, inverse_every=2, **kw)
    for a, b in zip(rows, grams):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    # refreshing steps kept InputGrams for the convolutions (c2: one per call) and rows for the
    # head; the others kept nothing (no factored form for these rows)
    assert all(isinstance(c, gc.InputGram) for c in kept[0]["c2"]) and len(kept[0]["c2"]) == 2
    assert all(isinstance(c, gc.InputGram) for k in ("c1", "c3", "c4") for c in kept[0][k])
    assert all(isinstance(c, torch.Tensor) for c in kept_rows[0]["c2"])
    rows_bytes = sum(c.nbytes for k in ("c1", "c2", "c3") for c in kept_rows[0][k])
    gram_bytes = sum(t.nbytes for k in ("c1", "c2", "c3") for c in kept[0][k]
                     for t in (c.gram, c.total, c.probed))
    assert gram_bytes < 0.6 * rows_bytes


@pytest.mark.parametrize("module,shape", [
    (nn.Conv2d(3, 4, 3, padding=1, stride=2), (5, 3, 7, 6)),
    (nn.Conv2d(3, 4, (2, 3), dilation=2), (3, 7, 9)),  # unbatched: one slice
    (nn.Conv1d(3, 4, 3, padding="same"), (5, 3, 11))])
@pytest.mark.parametrize("max_bytes", [1, 2000, 1 << 30])
def test_row_chunks_are_the_rows_by_slices_of_the_batch(module, shape, max_bytes):
    x = torch.randn(shape)
    chunks = [conv.input_rows(module, part) for part in conv.batch_slices(module, x, max_bytes)]
    assert torch.equal(torch.cat(chunks), conv.input_rows(module, x))
    if max_bytes == 1 and len(shape) == 4 - isinstance(module, nn.Conv1d):
        assert len(chunks) == shape[0]


@pytest.mark.parametrize("kw", [{"closure_free": True}, {"fisher": "mc"}])
def test_closure_free_and_sampled_label_steps_equal_those_of_the_rows(kw, monkeypatch):
    """A step without a closure (the hooks armed between steps) and the "mc" Fisher's
    sampled-label pass reduce the rows alike."""
    rows, _ = _train("RING", False, monkeypatch, curvature_every=2, inverse_every=2, **kw)
    calls = []
    reduce_rows, conv_gram = input_gram.reduce_rows, _layer_rows.conv_input_gram
    monkeypatch.setattr(input_gram, "reduce_rows", lambda *a: calls.append(1) or reduce_rows(*a))
    monkeypatch.setattr(_layer_rows, "conv_input_gram",
                        lambda *a: calls.append(1) or conv_gram(*a))
    grams, _ = _train("RING", True, monkeypatch, curvature_every=2, inverse_every=2, **kw)
    for a, b in zip(rows, grams):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert len(calls) >= 4 * 5  # 4 refreshing steps of 7, 5 convolution calls each


class TwoSizes(nn.Module):
    """One convolution called on an 8x8 input (384 rows: reduced) and on a 1x1 one (6 rows,
    fewer than its 19 columns: kept), its two calls' inputs joined as one InputGram."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        big = torch.tanh(self.c(x)).mean((2, 3))
        small = torch.tanh(self.c(x[:, :, :1, :1])).flatten(1)
        return self.head(torch.cat([big, small], 1))


def _two_sizes(reduce: bool, monkeypatch):
    x, y = _data()
    torch.manual_seed(0)
    model = TwoSizes().double()
    if not reduce:
        monkeypatch.setattr(_pass_stats, "gram_layers", lambda opt, gp: {})
    opt = grng_torch.RING(model.parameters(), model=model, lr=0.05)
    kinds = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        kinds.append([type(c).__name__ for c in opt.collector.a.get(0, [])])
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    monkeypatch.undo()
    return [p.detach().clone() for p in model.parameters()], kinds


def test_a_layer_with_reduced_and_kept_calls(monkeypatch):
    rows, _ = _two_sizes(False, monkeypatch)
    grams, kinds = _two_sizes(True, monkeypatch)
    assert kinds[0] == ["InputGram", "Tensor"]
    for a, b in zip(rows, grams):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_joined_inputs_equal_the_reduced_concatenation():
    """A layer's calls kept as rows and as an InputGram join into the InputGram of all the
    rows, the check's probe products (with the bias column) included."""
    layer = find_layers(TwoSizes()).layers[0]
    a1, a2 = torch.randn(7, 18, dtype=torch.float64), torch.randn(25, 18, dtype=torch.float64)
    xp = array_api_compat.array_namespace(a1)
    got = _layer_rows.joined_inputs(layer, [a1, input_gram.reduce_rows(a2, True, xp,
                                                                       torch.float64)])
    want = input_gram.reduce_rows(torch.cat([a1, a2]), True, xp, torch.float64)
    assert got.n == want.n == 32
    for name in ("gram", "total", "probed"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))


def test_a_linear_layers_rows_stay_a_view_of_its_input(monkeypatch):
    """A hidden layer's rows are its input itself (autograd keeps it): no copy is kept."""
    _, kept = _train("RING", True, monkeypatch, steps=1)
    model_inputs = kept[0]["head"]
    assert len(model_inputs) == 1 and model_inputs[0]._base is not None  # a view, not a clone


def test_r_kalman_keeps_the_rows(monkeypatch):
    _, kept = _train("RKalman", True, monkeypatch, steps=2)
    assert all(isinstance(c, torch.Tensor) for c in kept[0]["c1"])


def test_a_functional_tie_of_a_convolution_is_still_named():
    torch.manual_seed(0)
    model = Net(tie=True).double()
    x, y = _data()
    opt = grng_torch.RING(model.parameters(), model=model)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        assert all(isinstance(c, gc.InputGram) for c in opt.collector.a[0])  # c1's, reduced
        loss.backward()
        return loss
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step(closure)
    named = [str(w.message) for w in rec if "is not the product of the layer's own" in
             str(w.message)]
    assert len(named) == 1 and "'c1'" in named[0]
