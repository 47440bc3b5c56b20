"""torch.distributed collectives for the core (`grng_core.Collective`).

Under DistributedDataParallel every rank holds the same parameters and DDP averages the
gradients; the optimizer averages the curvature statistics with these collectives so that
every rank computes the same step:

- `mean(x)`: all_reduce (sum) divided by the world size;
- `gather(x)`: all_gather, concatenated along axis 0 (per-example rows; every rank must hold
  the same number of rows, i.e. equal local batch sizes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import grng_core as gc


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def torch_collective(group=None) -> gc.Collective:
    """A `gc.Collective` over the process group `group` (default: the world)."""

    def mean(x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone().contiguous()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y / dist.get_world_size(group)

    def gather(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    return gc.Collective(mean=mean, gather=gather, replicas=dist.get_world_size(group))
