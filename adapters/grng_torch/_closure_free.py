"""`step()` without a closure (loops that call backward() themselves: Hugging Face's
Trainer, Lightning, accelerate): what such a step cannot give, GradScaler's detection, and
the closure advice every refusal carries. The hooks' arming is `Collector.arm`, planned by
`_step.arm_for_closure_free`."""

from __future__ import annotations

import os
import sys
from typing import Any

CLOSURE_HELP = ("the optimizer re-evaluates the loss where the algorithm needs it, and its "
                "statistics come from the forward and backward passes inside the closure. "
                "Write\n    def closure():\n        opt.zero_grad()\n        loss = "
                "loss_fn(model(x), y)\n        loss.backward()\n        return loss\n"
                "    opt.step(closure)\nTo accumulate gradients over micro-batches, run all of "
                "them inside the closure (each forward and backward, each loss scaled by its "
                "share of the batch)")


def closure_needs(sp) -> list[str]:
    """What a step of this plan needs the closure for (re-evaluating the loss)."""
    return [what for what, on in (
        ("a regularized gradient (rho > 0: gr='double_backprop' / 'finite_difference' "
         "re-evaluate the loss)", sp.hvp or sp.fd),
        ("sampled labels (fisher='mc')", bool(sp.mc) or bool(sp.pe["mc"])),
        ("per-example gradients (structure 'woodbury', or 'diagonal' with fisher='mc')",
         bool(sp.pe["empirical"]))) if on]


def _grad_scaler() -> Any:
    """The `torch.amp.GradScaler` whose `step` called this optimizer's (directly or through
    accelerate), or None."""
    frame: Any = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "step" and code.co_filename.endswith(
                os.path.join("amp", "grad_scaler.py")):
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None


def check_closure_free(opt, sp) -> None:
    """A step without a closure (Hugging Face's Trainer, Lightning, accelerate call
    `optimizer.step()` after their own backward) can use only what that backward gave: the
    gradients and the K-FAC rows the hooks kept (`Collector.arm`, opened after each such step
    and at construction). Anything that re-evaluates the loss needs the closure."""
    needs = closure_needs(sp)
    scaler = _grad_scaler() if opt.collector is not None else None
    scaled = scaler is not None and scaler.is_enabled()
    if needs and scaled:
        raise TypeError(f"{type(opt).__name__}.step() under an enabled torch.amp.GradScaler "
                        f"cannot give {'; '.join(needs)}: that needs a closure, which "
                        "GradScaler does not pass. Use bfloat16 autocast without a scaler "
                        "(Hugging Face: bf16=True instead of fp16=True), or RING (or rho=0), "
                        "which needs only your backward")
    if needs:
        raise TypeError(f"{type(opt).__name__}.step() without a closure cannot give "
                        f"{'; '.join(needs)}. Pass a closure ({CLOSURE_HELP}), or use RING "
                        "(or rho=0), which needs only the gradient and the layer statistics "
                        "of your own backward")
    if scaled and scaler is not None:  # GradScaler unscaled the gradients; the rows kept its scale
        opt.collector.loss_scale = float(scaler.get_scale())
    if opt.collector is not None and not opt.collector.armed:
        opt.collector.arm(sp.emp, sp.rows_only, sp.warmup_only)
        raise TypeError(f"{type(opt).__name__}.step() without a closure reads the K-FAC "
                        "statistics of the backward passes since the previous step; this "
                        "optimizer has been stepping with a closure, so there are none yet. "
                        "Use one way throughout")
