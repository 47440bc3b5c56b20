"""Torch steppers: each owns a model's optimizer and does one training step on a batch,
``stepper.step(x, y) -> float`` (the batch loss before the update); the harness times it.
One class per way the optimizers want to be driven (plain, SophiaH, SAM, IVON, ASDL K-FAC).

Every step also records ``step_grad_norm``: the global L2 norm of the step's minibatch gradient at
the parameters the step starts from, read from ``.grad`` right after the step's first backward,
before the optimizer changes it; ``probe_s`` is the time that took (the harness leaves it out
of the step time).
"""

from __future__ import annotations

import math
import time


class TorchStepper:
    """One optimizer on one torch model; ``step`` does forward, backward and the update."""

    step_grad_norm = math.nan  # this step's minibatch gradient norm
    probe_s = 0.0  # seconds this step spent measuring it

    def __init__(self, model, loss_fn, opt):
        self.model, self.loss_fn, self.opt = model, loss_fn, opt

    def step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.probe()
        self.opt.step()
        return loss.item()

    def probe(self) -> None:
        """Record the global L2 norm of the parameters' ``.grad`` now, and its cost."""
        import torch

        t0 = time.perf_counter()
        with torch.no_grad():
            gs = [p.grad.detach().reshape(-1) for p in self.model.parameters()
                  if p.grad is not None]
            self.step_grad_norm = float(torch.linalg.vector_norm(torch.cat(gs))) if gs \
                else math.nan
        self.probe_s = time.perf_counter() - t0

    def optimizers(self):
        return [self.opt]


class SophiaStepper(TorchStepper):
    """SophiaH estimates the Hessian diagonal by Hutchinson: the backward keeps its graph
    (attention on SDPA's math kernel, the one with a double backward, as GRNG's RENG does)."""

    def step(self, x, y) -> float:
        from grng_torch._passes import twice_differentiable_attention

        self.opt.zero_grad(set_to_none=True)
        with twice_differentiable_attention():
            loss = self.loss_fn(self.model(x), y)
            loss.backward(create_graph=True)
        self.probe()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # breaks the grad <-> graph reference cycle
        return loss.item()


class SAMStepper(TorchStepper):
    """SAM: ascent step to w + rho g/|g|, gradient there, base-optimizer step from w."""

    def step(self, x, y) -> float:
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.probe()  # the gradient at w, not at the ascent point
        self.opt.first_step(zero_grad=True)
        self.loss_fn(self.model(x), y).backward()
        self.opt.second_step(zero_grad=True)
        return loss.item()


class IVONStepper(TorchStepper):
    """IVON: the gradient is taken at weights sampled from the variational posterior."""

    def step(self, x, y) -> float:
        with self.opt.sampled_params(train=True):
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.probe()  # IVON's gradient: at the sampled weights
        self.opt.step()
        return loss.item()


class ASDLKfacStepper(TorchStepper):
    """ASDL K-FAC: its gradient maker runs forward + backward, collects the Kronecker
    factors on curvature steps and replaces .grad by the preconditioned gradient; then SGD.
    The gradient norm is read just before that replacement (``gm.precondition``)."""

    def __init__(self, model, loss_fn, opt, gm, flatten_targets: bool = False):
        super().__init__(model, loss_fn, opt)
        self.gm, self.flatten = gm, flatten_targets
        precondition = gm.precondition

        def probed(*args, **kwargs):
            self.probe()
            return precondition(*args, **kwargs)

        gm.precondition = probed

    def step(self, x, y) -> float:
        if self.flatten:
            y = y.reshape(-1)
        self.opt.zero_grad(set_to_none=True)
        dummy_y = self.gm.setup_model_call(self.model, x)
        self.gm.setup_loss_call(self.loss_fn, dummy_y, y)
        _, loss = self.gm.forward_and_backward()
        self.opt.step()
        return loss.item()


class GRNGStepper(TorchStepper):
    """``opt.step(closure)``: the closure zeroes the grads, runs the model and the loss module
    and calls ``backward``; the optimizer calls it again where its algorithm needs to (the
    gradient norm is read after its first call: the minibatch gradient at the current point)."""

    def __init__(self, model, loss_mod, opt, flatten_targets: bool):
        super().__init__(model, loss_mod, opt)
        self.flatten = flatten_targets

    def step(self, x, y) -> float:
        if self.flatten:
            y = y.reshape(-1)
        model, loss_mod, opt = self.model, self.loss_fn, self.opt
        calls = []

        def closure():
            self.zero_grad()
            loss = loss_mod(model(x), y)
            loss.backward()
            if not calls:
                self.probe()
            calls.append(1)
            return loss

        return float(opt.step(closure).detach())

    def zero_grad(self) -> None:
        """What the closure zeroes: the optimizer's parameters' gradients."""
        self.opt.zero_grad()
