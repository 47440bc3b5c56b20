"""What splitting a torch model's parameters into param groups changes (README "Param groups
split nothing"): the first step at the library's defaults, one group against (a) two groups of
whole layers and (b) the weight-decay recipe's split (weights in one group, biases in the
other, equal hyperparameters), as ‖u_split − u_one‖ / ‖u_one‖ of the update u; and the
closure calls of a step (the finite-difference passes the groups share).

    python -m benchmarks.param_groups

The digits MLP 64-128-64-10 (tanh) of the default suite, float64, its first 64 training
examples.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from benchmarks.data import digits
from benchmarks.models import mlp

OPTIMIZERS = (("RING (adaptive_damping)", "RING", {}),
              ("RING (gauss_newton)", "RING", {"form": "gauss_newton"}),
              ("RENG", "RENG", {}), ("R-Kalman", "RKalman", {}))


def _groups(model: nn.Sequential, split: str):
    if split == "one":
        return list(model.parameters())
    if split == "layers":  # the first layer, then the rest
        first = list(model[0].parameters())
        ids = {id(p) for p in first}
        return [{"params": first}, {"params": [p for p in model.parameters()
                                               if id(p) not in ids]}]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases}]


def first_step(cls_name: str, kw: dict, split: str, steps: int = 2):
    """(update of the first step, closure calls of each step)."""
    import grng_torch

    arrays = digits()
    x = torch.as_tensor(arrays.x_train[:64], dtype=torch.float64)
    y = torch.as_tensor(arrays.y_train[:64])
    torch.manual_seed(0)
    model = mlp((64, 128, 64, 10)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = getattr(grng_torch, cls_name)(_groups(model, split), model=model, loss_fn=loss_fn,
                                        **kw)
    calls: list[int] = []

    def closure():
        calls[-1] += 1
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    update = None
    for _ in range(steps):
        calls.append(0)
        opt.step(closure)
        if update is None:
            update = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    return update, calls


def main() -> None:
    torch.set_num_threads(1)
    print("| optimizer (defaults) | two groups of whole layers | weights / biases split | "
          "closure calls per step (one group / two) |")
    print("|---|---:|---:|---|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, cls_name, kw in OPTIMIZERS:
            one, calls_one = first_step(cls_name, kw, "one")
            layers, calls_two = first_step(cls_name, kw, "layers")
            split, _ = first_step(cls_name, kw, "split")
            norm = float(one.norm())
            print(f"| {label} | {float((layers - one).norm()) / norm:.1e} | "
                  f"{float((split - one).norm()) / norm:.0%} | {calls_one} / {calls_two} |")


if __name__ == "__main__":
    main()
