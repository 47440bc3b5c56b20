"""RING on every parameter but the tied ones, AdamW on those (README "Tied embeddings"): the
split a user makes for a language model whose embedding is tied to its output layer (GPT-2's
`wte` and `lm_head`), where GRNG leaves the tied weight to the diagonal structure (§2.1).
A fixed benchmark row, not swept; AdamW's rate is fixed at the one the suite selects for
AdamW on the GPT-2 task (1/600)."""

from __future__ import annotations

from collections import Counter

from benchmarks.steppers import GRNGStepper

ADAMW_LR = 1 / 600


def tied_parameters(model) -> list:
    """Parameters that more than one module holds (`named_parameters(remove_duplicate=False)`
    lists them once per holder)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [p for p in model.parameters() if counts[id(p)] > 1]


class TiedHybridStepper(GRNGStepper):
    """GRNGStepper whose closure zeroes every gradient (the model's), then AdamW's step on
    the tied parameters with the gradient the GRNG step left them (the first pass's)."""

    def __init__(self, model, loss_mod, opt, adamw, flatten_targets: bool):
        super().__init__(model, loss_mod, opt, flatten_targets)
        self.adamw = adamw

    def step(self, x, y) -> float:
        out = super().step(x, y)
        self.adamw.step()
        return out

    def zero_grad(self) -> None:
        self.model.zero_grad()


def build(model, ring_kwargs: dict, flatten_targets: bool):
    """The stepper: RING(**ring_kwargs) on the untied parameters, AdamW on the tied ones."""
    import grng_torch
    import torch
    from torch import nn

    tied = tied_parameters(model)
    ids = {id(p) for p in tied}
    rest = [p for p in model.parameters() if id(p) not in ids]
    loss_mod = nn.CrossEntropyLoss()
    opt = grng_torch.RING(rest, model=model, loss_fn=loss_mod, **ring_kwargs)
    adamw = torch.optim.AdamW(tied, lr=ADAMW_LR)
    return TiedHybridStepper(model, loss_mod, opt, adamw, flatten_targets)
