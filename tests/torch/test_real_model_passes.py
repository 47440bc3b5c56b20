"""Per-example and sampled-label ("mc") passes on real models: a Hugging Face model returns a
`ModelOutput` (its `logits` are used, or `output_fn=`), a nanoGPT-style closure reshapes
(B, T, V) logits to (B·T, V) before the loss (followed), BatchNorm in training mode gets a
clear error before any vmap. Per-example gradients are checked against a loop over examples
(their mean is the batch gradient)."""

from __future__ import annotations

import grng_torch as gt
import pytest
import torch
from grng_torch._functional import per_example_grads
from torch import nn

from tests.torch.zoo import ZOO

transformers = pytest.importorskip("transformers")
V = 48


def _lm_closure(opt, model, x, y, reshape: bool):
    def closure():
        opt.zero_grad()
        logits = model(x).logits
        if reshape:  # nanoGPT: logits.view(-1, V) against targets.view(-1)
            loss = opt.loss_fn(logits.reshape(-1, V), y.reshape(-1))
        else:  # CrossEntropyLoss's (B, C, T) layout
            loss = opt.loss_fn(logits.transpose(1, 2), y)
        loss.backward()
        return loss

    return closure


PATHS = [(dict(structure="woodbury"), True), (dict(structure="diagonal", fisher="mc"), True),
         (dict(structure="kfac", fisher="mc"), True), (dict(structure="kfac", fisher="mc"), False)]


@pytest.mark.parametrize("kw, reshape", PATHS,
                         ids=["woodbury-view", "diagonal-mc-view", "kfac-mc-view", "kfac-mc-BCT"])
def test_gpt2_per_example_paths_run(kw, reshape):
    z = ZOO["gpt2"]()
    opt = gt.RING(z.model.parameters(), model=z.model, loss_fn=nn.CrossEntropyLoss(), lr=0.05,
                  damping=1e-2, kl_clip=1e-3, **kw)
    losses = []
    for k in range(4):
        x, y = z.batch(k)
        losses.append(float(opt.step(_lm_closure(opt, z.model, x, y, reshape)).detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert opt.describe().skipped == 0


def test_per_example_gradients_of_a_reshaping_closure_match_a_loop():
    """The per-example gradients the woodbury path uses (ModelOutput -> logits, (B·T, V)
    loss input) equal a loop of ordinary backward passes, one example at a time."""
    z = ZOO["gpt2"](B=3, T=6)
    model = z.model.double()
    x, y = z.batch(0)
    crit = nn.CrossEntropyLoss()
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"]  # wte: tied
    got = per_example_grads(model, names, (x,), {}, y.reshape(-1), x.shape[0], crit,
                            loss_shape=(x.shape[0] * x.shape[1], V))
    params = dict(model.named_parameters(remove_duplicate=False))
    for b in range(x.shape[0]):
        model.zero_grad()
        crit(model(x[b:b + 1]).logits.reshape(-1, V), y[b]).backward()
        for n in names:
            assert torch.allclose(got[n][b], params[n].grad, rtol=1e-8, atol=1e-12), n


def test_output_fn_selects_the_tensor():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.net(x), "aux": x.sum()}

    torch.manual_seed(0)
    model = Wrapped().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    crit = nn.CrossEntropyLoss()

    def make(**kw):
        return gt.RING(model.parameters(), model=model, loss_fn=crit, lr=0.1,
                       structure="woodbury", **kw)

    def closure(opt):
        def c():
            opt.zero_grad()
            loss = opt.loss_fn(model(x)["scores"], y)
            loss.backward()
            return loss
        return c

    with pytest.raises(TypeError, match="output_fn="):
        make().step(closure(make()))
    opt = make(output_fn=lambda out: out["scores"])
    opt.step(closure(opt))
    assert opt.describe().skipped == 0


def test_batchnorm_in_training_mode_is_a_clear_error_before_vmap():
    z = ZOO["resnet_bn"]()
    opt = gt.RING(z.model.parameters(), model=z.model, loss_fn=nn.CrossEntropyLoss(),
                  structure="woodbury", lr=0.05)
    x, y = z.batch(0)
    before = [p.detach().clone() for p in z.model.parameters()]

    def closure():
        opt.zero_grad()
        loss = opt.loss_fn(z.model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"BatchNorm in training mode.*\['bn'") as info:
        opt.step(closure)
    assert "structure='kfac'" in str(info.value)
    assert all(torch.equal(p, b) for p, b in zip(z.model.parameters(), before))
    z.model.eval()  # the documented way: eval-mode BatchNorm
    opt.step(closure)
    assert opt.describe().skipped == 0


def test_model_output_without_logits_names_the_fix():
    model = nn.Linear(3, 2)
    opt = gt.RING(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(),
                  structure="woodbury")
    with pytest.raises(TypeError, match="output_fn"):
        opt.output_fn(object())
