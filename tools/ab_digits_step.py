"""Interleaved A/B of the default suite's digits-MLP step (64-128-64-10, tanh, batch 64, the
step-cost rows' hyperparameters) between two checkouts of this project, e.g. a worktree of an
older commit and the working tree: each round runs one process per checkout, alternating, and
prints each row's best window (thread CPU time per step, so that another tenant's load on a
shared machine counts less).

    git worktree add /tmp/base <commit>
    python tools/ab_digits_step.py /tmp/base . --rounds 4 --rows ring_gn ring asdl_kfac
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import sys, time, warnings, torch
warnings.filterwarnings("ignore")
root = sys.argv[1]
sys.path[:0] = [root, root + "/adapters"]
torch.set_num_threads(1)
import grng_core
assert grng_core.__file__.startswith(root), grng_core.__file__
from benchmarks.stepcost_setup import DIGITS
from benchmarks.stepcost_torch import torch_rows
builders = {k: b for k, _, b in torch_rows(False)}
x, y = DIGITS.batch(64)
out = []
for key in sys.argv[2:]:
    st = builders[key](DIGITS.model(), 64)
    for _ in range(30):
        st.step(x, y)
    best = 1e9
    for _ in range(5):
        t = time.thread_time()
        for _ in range(100):
            st.step(x, y)
        best = min(best, (time.thread_time() - t) / 100)
    out.append(f"{key}={best * 1e3:.3f}ms")
print(" ".join(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="checkout A (its root folder)")
    p.add_argument("b", help="checkout B")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows", nargs="+", default=["ring_gn", "ring", "asdl_kfac"])
    args = p.parse_args()
    roots = [os.path.abspath(args.a), os.path.abspath(args.b)]
    for _ in range(args.rounds):
        for label, root in zip("AB", roots):
            res = subprocess.run([sys.executable, "-c", CHILD, root, *args.rows],
                                 capture_output=True, text=True, check=True)
            print(f"{label} {res.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
