"""How far each block moves: the relative change ‖Δθ‖/‖θ‖ of BERT's (tests/torch/zoo.py) query
weights and embedding tables after 5 steps, AdamW against GRNG at its defaults (README
"Defaults": the block-scale gap the global trust region does not close).

    python -m benchmarks.block_scale
"""

from __future__ import annotations

import warnings

import torch

PARTS = ("attention.self.query.weight", "token_type_embeddings.weight",
         "word_embeddings.weight")


def moved(make, steps: int = 5) -> list[float]:
    from tests.torch.zoo import ZOO

    torch.manual_seed(0)
    z = ZOO["bert"]()
    before = {n: p.detach().clone() for n, p in z.model.named_parameters()}
    opt = make(z.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(steps):
            z.step(opt, k)
    rel = {n: float((p.detach() - before[n]).norm() / before[n].norm())
           for n, p in z.model.named_parameters()}
    return [next(v for n, v in rel.items() if n.endswith(part)) for part in PARTS]


def main() -> None:
    import grng_torch as gt

    torch.set_num_threads(1)
    rows = {"AdamW (lr 1e-3)": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
            "RING (defaults)": lambda m: gt.RING(m.parameters(), model=m),
            "RKalman (defaults)": lambda m: gt.RKalman(m.parameters(), model=m)}
    print(f"{'optimizer':20s} " + " ".join(f"{p.split('.')[-2]:>22s}" for p in PARTS))
    for name, make in rows.items():
        print(f"{name:20s} " + " ".join(f"{v:22.2e}" for v in moved(make)))


if __name__ == "__main__":
    main()
