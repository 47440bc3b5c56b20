"""What one param group's update reads of the whole model (`grng_core.Whole`), so that
splitting the parameters into groups with the same hyperparameters changes no step, as in
torch.optim (Hugging Face's Trainer, for one, puts biases and norms in a group of their own):
‖g‖² over every group's gradient (RING's c_t, ALGORITHMS.md §3.2; the finite-difference
radius, §1) and the trust region's η²⟨d, ĝ⟩ summed over the groups (§3 tail). The groups'
oracles (`_passes.hvp_fn`, `_passes.grad_fn`) differentiate the whole model as well."""

from __future__ import annotations

import torch

import grng_core as gc
from grng_core.config import per_step_damping, uses_estimator


def whole_of(sp, grads: dict) -> gc.Whole | None:
    """None for a single group (its own gradient is the whole)."""
    if len(sp.groups) < 2:
        return None
    configs = [gp.core.config for gp in sp.groups]
    kl = any(c.kl_clip is not None for c in configs)
    norm = None
    if any(per_step_damping(c) or (uses_estimator(c) and c.gr == "finite_difference")
           for c in configs):
        gs = [x for gp in sp.groups for x in grads[gp.index] if x is not None]
        if gs:
            dtype = torch.float64 if any(x.dtype == torch.float64 for x in gs) else torch.float32
            dev = gs[0].device
            norm = torch.stack([torch.sum(torch.square(x.detach().to(dtype))).to(dev)
                                for x in gs]).sum()
    return gc.Whole(grad_sq_norm=norm, kl=kl)


def kl_total(pending: list):
    """Σ over the groups of their η²⟨d, ĝ⟩ (`grng_core.optimizer.Pending.kl_term`)."""
    terms = [p.kl_term for p in pending if p.kl_term is not None]
    if not terms:
        return None
    dev = terms[0].device
    return torch.stack([t.to(device=dev, dtype=torch.float64) for t in terms]).sum()


def vectors(sp, grads: dict) -> list:
    """The whole gradient over `sp.all_params` (None where a parameter has none): the vector
    a group's Hessian-vector product and shifted passes move along."""
    return [None if x is None else x.detach() for gp in sp.groups for x in grads[gp.index]]
