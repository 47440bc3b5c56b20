"""In float64 the torch adapter on an nn.Sequential MLP takes the core's step on the reference
MLP (grng_core.reference, hand-written gradients, statistics and HVPs) with the same weights
and batches, to a relative 1e-10: for every optimizer x structure x GR estimator x Fisher.

The reference side runs the core on NumPy arrays; the torch side runs only grng_torch (hooks,
torch.func per-example gradients, double backprop, closure re-evaluation). For fisher="mc"
both sides use the same sampled targets (handed to the adapter as `sample_targets`).
"""

from __future__ import annotations

import grng_torch as gt
import pytest
import torch

from tests import cases
from tests import equivalence as E

# every row of the table (tests/cases.py), each Fisher, finite differences forward and central
CASES = cases.variants(cases.select(), fd_scheme=("forward", "central"), fisher=cases.FISHERS)
# every case with softmax cross-entropy; the empirical, non-central ones with mse as well
PARAMS = [(c, "softmax_ce") for c in CASES] + [
    (c, "mse") for c in CASES if c.fisher == "empirical" and c.fd_scheme != "central"]


@pytest.mark.parametrize("case, loss", PARAMS, ids=[f"{l}-{c.id}" for c, l in PARAMS])
def test_torch_step_equals_core_on_reference_mlp(case, loss):
    hp = E.hyperparameters(case)
    mlp = E.mlp(loss)
    params = mlp.init(seed=3)
    xs, ys, mc = E.data(loss, seed=7)
    want, _ = E.reference_run(case.bare.build(**hp), mlp, params, xs, ys, mc)
    got, opt = E.torch_run(case, hp, mlp, params, xs, ys, mc, loss)
    E.assert_close(got, want)


def test_adapter_collects_reference_statistics():
    """The hooks' K-FAC rows and the torch.func per-example gradients are the reference's."""
    mlp = E.mlp("softmax_ce")
    params = mlp.init(seed=1)
    xs, ys, _ = E.data("softmax_ce", seed=2)
    model, loss_fn = E.torch_model(mlp, params, "softmax_ce")
    seen = {}

    class Spy(gt.RENG):
        pass

    opt = Spy(model.parameters(), model=model, loss_fn=loss_fn, structure="kfac", rho=0.0)
    core_prepare = opt.core(0).prepare  # the adapter's update is prepare + finish

    def spy_prepare(grads, state, params_, stats=None, **kw):
        seen["stats"] = stats
        return core_prepare(grads, state, params_, stats=stats, **kw)

    object.__setattr__(opt.core(0), "prepare", spy_prepare)
    x, y = torch.from_numpy(xs[0]), torch.from_numpy(ys[0])

    def closure():
        opt.zero_grad()
        value = loss_fn(model(x), y)
        value.backward()
        return value

    from grng_torch._functional import per_example_grads

    names = [n for n, _ in model.named_parameters()]
    pe = per_example_grads(model, names, (x,), {}, y, E.B, loss_fn)
    opt.step(closure)
    ref = mlp.stats(params, xs[0], ys[0], kind="both")
    assert len(seen["stats"].layers) == len(ref.layers)
    for got, want in zip(seen["stats"].layers, ref.layers):
        assert (got.weight, got.bias) == (want.weight, want.bias)
        assert E.rel(got.inputs.numpy(), want.inputs) < 1e-13
        assert E.rel(got.output_grads.numpy(), want.output_grads) < 1e-13
    for n, want in zip(names, ref.per_example_grads):
        assert E.rel(pe[n].numpy(), want) < 1e-13
