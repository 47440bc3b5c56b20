"""What one param group's update reads of the whole model (`grng_core.Whole`), so that
splitting the parameters into groups with the same hyperparameters changes no step, as in
torch.optim: ‖g‖² over every group's gradient (RING's c_t, ALGORITHMS.md §3.2; the
finite-difference radius, §1) and the trust region's η²⟨d, ĝ⟩ summed over the groups (§3
tail). The groups' oracles (`_passes.hvp_fn`, `_passes.grad_fn`) differentiate the whole model
as well, and a step skipped as non-finite in one group is skipped in all (`skip_together`)."""

from __future__ import annotations

import torch

import grng_core as gc
from grng_core.concrete import host_bool
from grng_core.config import per_step_damping, uses_estimator
from grng_core.state import map_arrays


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
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.stack([t.to(device=dev, dtype=dtype) for t in terms]).sum()


def vectors(sp, grads: dict) -> list:
    """The whole gradient over `sp.all_params` (None where a parameter has none): the vector
    a group's Hessian-vector product and shifted passes move along."""
    return [None if x is None else x.detach() for gp in sp.groups for x in grads[gp.index]]


def skip_together(before: list, results: list) -> list:
    """[(updates, GroupState)] with a step skipped as non-finite in one group skipped in
    every group (nothing moves, each `skipped` counts it), as one group would: `before` is
    each group's state before the step. Decided on the host for CPU groups; on an accelerator
    selected in place (no device-to-host read)."""
    hit = [new.core.skipped > old.skipped for old, (_, new) in zip(before, results)]
    dev = hit[0].device
    any_hit = torch.stack([h.to(dev) for h in hit]).any()
    verdict = host_bool(any_hit)
    if verdict is False:
        return results
    out = []
    for old, h, (updates, new) in zip(before, hit, results):
        forced = old._replace(skipped=old.skipped + 1)
        if verdict is True:
            out.append((updates, new) if host_bool(h) else
                       ([torch.zeros_like(u) for u in updates], new._replace(core=forced)))
            continue
        other = any_hit.to(h.device) & ~h  # skipped elsewhere, not here
        out.append(([torch.where(other, torch.zeros_like(u), u) for u in updates],
                    new._replace(core=map_arrays(lambda n, f, o=other: torch.where(o, f, n),
                                                 new.core, forced))))
    return out
