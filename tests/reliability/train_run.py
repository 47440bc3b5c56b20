"""A training run that checkpoints and resumes: the subprocess of the crash-and-resume tests.

    python -m tests.reliability.train_run --dir DIR --config reng-kfac --steps 30 --every 3

Trains the reference MLP with the NumPy core on a deterministic stream of batches (batch t is
drawn from a generator seeded with t, so a resumed run sees the batches the killed one would
have). Every `--every` steps it writes DIR/ckpt.npz atomically (grng_core.checkpoint when
present, else tests/reliability/atomic_npz.py): parameters, optimizer state and the data step
in one file. On start it resumes from DIR/ckpt.npz when that exists. After each step it prints
`step T <sha256 of params and state>` (flushed) so the parent can kill it at a chosen step;
`--pause-before-rename T` prints `renaming T` and sleeps between writing step T's temporary
file and renaming it, so the parent can kill it mid-write. At the end it writes DIR/final.npz.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np

import grng_core as gc
from grng_core.reference import MLP
from tests import cases
from tests.reliability import atomic_npz

# rows of the test suites' table (tests/cases.py) with this run's hyperparameters
CONFIGS = {
    "reng-kfac": cases.get("reng/kfac/double_bp").using(
        lr=0.05, momentum=0.9, curvature_every=2, inverse_every=3),
    "ring-woodbury": cases.get("ring/woodbury/-").using(lr=0.05, weight_decay=1e-4),
    "rkalman-kfac": cases.get("rkalman/kfac/fin_diff:central").using(
        lr=0.2, inverse_every=4, kl_clip=1e-2),
    "reng-diagonal": cases.get("reng/diagonal/fin_diff:forward").using(lr=0.05, momentum=0.5),
}
SIZES, BATCH = (6, 12, 4), 16


def batch(t: int):
    rng = np.random.default_rng(10_000 + t)
    x = rng.standard_normal((BATCH, SIZES[0]))
    labels = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)
    return x, np.eye(SIZES[-1])[labels]


def digest(tree_leaves) -> str:
    h = hashlib.sha256()
    for a in tree_leaves:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def flat(tree) -> list:
    from grng_core.codec import to_portable

    tree = to_portable(tree)
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in flat(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in flat(v)]
    return [tree]


def checkpoint_module():
    """grng_core.checkpoint (save_state/load_state) when it exists, else the test's writer."""
    try:
        from grng_core import checkpoint
    except ImportError:
        return atomic_npz, "atomic_npz"
    return checkpoint, "grng_core.checkpoint"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--pause-before-rename", type=int, default=None, metavar="STEP",
                    help="at this step's checkpoint, print 'renaming STEP' and sleep 60 s "
                         "between writing the temporary file and renaming it")
    ap.add_argument("--writer", choices=["auto", "atomic_npz"], default="auto")
    args = ap.parse_args(argv)

    config = CONFIGS[args.config]
    opt = config.build()
    mlp = MLP(SIZES, activation="tanh")
    layers = [gc.LayerSpec(*mlp.layer_keys(k)) for k in range(mlp.n_layers)]
    params = mlp.init(seed=0)
    state = opt.init(params, layers=layers if config.structure == "kfac" else None)
    t = np.zeros((), dtype=np.int64)
    ckpt_mod, ckpt_name = (atomic_npz, "atomic_npz") if args.writer == "atomic_npz" \
        else checkpoint_module()
    path = os.path.join(args.dir, "ckpt.npz")

    if args.pause_before_rename is not None:
        real_replace = os.replace

        def slow_replace(src, dst):  # the temporary file is complete; the target is not yet
            if dst == path and int(t) == args.pause_before_rename:
                print(f"renaming {int(t)}", flush=True)
                time.sleep(60)
            real_replace(src, dst)

        os.replace = slow_replace

    template = {"params": params, "opt": state, "t": t}
    if os.path.exists(path):
        loaded = ckpt_mod.load_state(path, like=template)
        params, state, t = loaded["params"], loaded["opt"], loaded["t"]
        print(f"resumed {int(t)} with {ckpt_name}", flush=True)
    else:
        print(f"fresh with {ckpt_name}", flush=True)

    while int(t) < args.steps:
        x, y = batch(int(t))
        b = mlp.batch(params, x, y, per_example=opt.requirements.per_example_grads,
                      layer_stats=opt.requirements.layer_stats)
        stats = gc.Stats(per_example_grads=b.per_example_grads, layers=b.layers)
        updates, state = opt.update(b.grads, state, params, stats=stats,
                                    oracle=mlp.oracle(x, y))
        params = gc.apply_updates(params, updates)
        t = t + 1
        print(f"step {int(t)} {digest(flat(params) + flat(state))}", flush=True)
        if int(t) % args.every == 0 or int(t) == args.steps:
            ckpt_mod.save_state(path, {"params": params, "opt": state, "t": t})
    atomic_npz.save_state(os.path.join(args.dir, "final.npz"),
                          {"params": params, "opt": state, "t": t})
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
