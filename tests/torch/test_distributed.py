"""DistributedDataParallel on CPU: 2 processes (gloo, 127.0.0.1), each with half of every
batch, end where one process on the combined batches ends (float64 round-off), and the two
ranks hold the same parameters: the curvature statistics are averaged (all_reduce) and the
per-example rows gathered (all_gather) across ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests import cases

WORLD = 2
B = 12  # combined batch; each rank gets B / WORLD rows
STEPS = 4

# rows of the table (tests/cases.py) with this suite's hyperparameters: (id, case, model)
CONFIGS = [(f"{case.id}-{model}" if model != "mlp" else case.id, case, model)
           for case, model in (
    (cases.get("ring/kfac/-").using(lr=0.2, damping=1e-2, momentum=0.5), "mlp"),
    (cases.get("ring/kfac/-+mc").using(lr=0.2, damping=1e-2), "mlp"),
    (cases.get("ring/kfac/-").using(lr=0.2, damping=1e-2), "conv"),
    (cases.get("reng/kfac/double_bp").using(lr=0.2, damping=1e-2), "mlp"),
    (cases.get("reng/diagonal/fin_diff").using(lr=0.05, damping=0.3), "mlp"),
    (cases.get("reng/woodbury/double_bp").using(lr=0.2, damping=0.1), "mlp"),
    (cases.get("rkalman/woodbury/fin_diff").using(lr=0.5), "mlp"),
    (cases.get("rkalman/kfac/fin_diff:central").using(lr=0.2, damping=1e-2), "mlp"),
)]
# under torch.distributed every layer takes the refresh warm-up (§2.1: ranks may see
# different rows and must issue the same collectives), though one process on the combined
# batch would let the convolution (192 rows >= 15·10) skip it: DDP equals that process with
# every layer warming up (`warmup_rows` None)
_WARM = dict(lr=0.2, damping=1e-2, refresh_warmup=3, curvature_every=2, inverse_every=2)
CONFIGS.append(("ring/kfac/-conv-warmup",
                cases.get("ring/kfac/-").using(**_WARM, warmup_rows=15), "conv"))
REFERENCE = {"ring/kfac/-conv-warmup": cases.get("ring/kfac/-").using(**_WARM, warmup_rows=None)}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        return nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 3, 3, padding=1),
                             nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)).double()
    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, 16, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (B,), generator=g) for _ in range(STEPS)]
    mcs = [torch.randint(0, 3, (B,), generator=g) for _ in range(STEPS)]
    return xs, ys, mcs


def _run(case, kind, rank=None):
    """STEPS steps: the whole batch (rank None) or this rank's half under DDP."""
    model = _model(kind)
    wrapped = model if rank is None else nn.parallel.DistributedDataParallel(model)
    crit = nn.CrossEntropyLoss()
    xs, ys, mcs = _data()
    rows = slice(None) if rank is None else slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    step = [0]
    opt = case.torch(wrapped.parameters(), model=wrapped, loss_fn=crit,
                     sample_targets=lambda out: mcs[step[0]][rows])
    for t in range(STEPS):
        step[0] = t
        x, y = xs[t][rows], ys[t][rows]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = crit(wrapped(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {name: _run(case, kind, rank) for name, case, kind in CONFIGS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _rel(a, b) -> float:
    a = torch.cat([x.reshape(-1) for x in a])
    b = torch.cat([x.reshape(-1) for x in b])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name, case, kind", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_ddp_equals_single_process_on_the_combined_batch(ddp_results, name, case, kind):
    single = _run(REFERENCE.get(name, case), kind)
    start = [p.detach() for p in _model(kind).parameters()]
    assert _rel(single, start) > 1e-3  # the runs moved
    for r in range(WORLD):
        assert _rel(ddp_results[r][name], single) < 1e-10, r
    assert _rel(ddp_results[1][name], ddp_results[0][name]) < 1e-13  # the same step
