"""Torch steppers: each owns a model's optimizer and does one training step on a batch,
``stepper.step(x, y) -> float`` (the batch loss before the update); the harness times it.
One class per way the optimizers want to be driven (plain, SophiaH, SAM, IVON, ASDL K-FAC)."""

from __future__ import annotations


class TorchStepper:
    """One optimizer on one torch model; ``step`` does forward, backward and the update."""

    def __init__(self, model, loss_fn, opt):
        self.model, self.loss_fn, self.opt = model, loss_fn, opt

    def step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()

    def optimizers(self):
        return [self.opt]


class SophiaStepper(TorchStepper):
    """SophiaH estimates the Hessian diagonal by Hutchinson: the backward keeps its graph."""

    def step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward(create_graph=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # breaks the grad <-> graph reference cycle
        return loss.item()


class SAMStepper(TorchStepper):
    """SAM: ascent step to w + rho g/|g|, gradient there, base-optimizer step from w."""

    def step(self, x, y) -> float:
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
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
        self.opt.step()
        return loss.item()


class ASDLKfacStepper(TorchStepper):
    """ASDL K-FAC: its gradient maker runs forward + backward, collects the Kronecker
    factors on curvature steps and replaces .grad by the preconditioned gradient; then SGD."""

    def __init__(self, model, loss_fn, opt, gm, flatten_targets: bool = False):
        super().__init__(model, loss_fn, opt)
        self.gm, self.flatten = gm, flatten_targets

    def step(self, x, y) -> float:
        if self.flatten:
            y = y.reshape(-1)
        self.opt.zero_grad(set_to_none=True)
        dummy_y = self.gm.setup_model_call(self.model, x)
        self.gm.setup_loss_call(self.loss_fn, dummy_y, y)
        _, loss = self.gm.forward_and_backward()
        self.opt.step()
        return loss.item()
