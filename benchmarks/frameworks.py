"""Torch / JAX glue of the harness: a batch as arrays of the run's framework, and evaluation
(logits, gradient norm) of a torch stepper's model (a JAX stepper provides both itself)."""

from __future__ import annotations

from benchmarks.losses import task_loss


def torch_arrays(x, y, task):
    import torch

    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    return xt, yt


def jax_arrays(x, y, task):
    import jax.numpy as jnp

    return jnp.asarray(x), jnp.asarray(y)


class TorchView:
    """Evaluation and gradient norm of a torch stepper's model."""

    def __init__(self, stepper, task):
        self.stepper, self.task = stepper, task

    def logits(self, x):
        import torch

        model = self.stepper.model
        training = model.training
        model.eval()  # BatchNorm's running statistics, as a user evaluates
        try:
            with torch.no_grad():
                return model(x).numpy()
        finally:
            model.train(training)

    def grad_norm(self, x, y):
        import torch

        model = self.stepper.model
        params = [p for p in model.parameters() if p.requires_grad]
        loss = task_loss(self.task)(model(x), y)
        grads = torch.autograd.grad(loss, params)
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
