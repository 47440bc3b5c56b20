"""Peak memory and time of a K-FAC refreshing step on a CIFAR-sized convolutional net (five 3x3
convolutions of 64 channels at 32x32 with BatchNorm, batch 64, one torch thread): grng_torch's
RING (gauss_newton) with its convolutions' rows reduced as they arrive (the default,
ALGORITHMS.md §2.1 "Input rows reduced early"), with the rows kept until the step (`rows`:
as before session 25), and AdamW's step for scale. Each in its own process: the rise of the
peak resident set size over the measured step (`benchmarks.peak_memory`), after 10 steps
(step 10 refreshes; the convolutions skip the warm-up, step 0 refreshes too).

    python -m benchmarks.refresh_memory
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def _net():
    from torch import nn

    def block(c):
        return [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(), *[m for _ in range(4) for m in block(64)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def measure(which: str, batch: int = 64) -> dict:
    """{which, peak_rise_mib, step_s, other_steps_s} of one setting, in this process: step 10
    (a refreshing one) against the mean of steps 1–9 (which refresh nothing)."""
    import grng_torch
    import torch
    from grng_torch import _pass_stats
    from torch import nn

    from benchmarks.peak_memory import PeakRSS

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _net()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if which == "adamw":
        opt = torch.optim.AdamW(model.parameters())
    else:
        if which == "rows":
            _pass_stats.gram_layers = lambda opt, gp: {}
        opt = grng_torch.RING(model.parameters(), model=model, form="gauss_newton")

    def step():
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if which == "adamw":
            closure()
            opt.step()
        else:
            opt.step(closure)
    step()  # step 0 refreshes
    t0 = time.perf_counter()
    for _ in range(9):
        step()
    plain = (time.perf_counter() - t0) / 9
    peak = PeakRSS()
    peak.reset()
    t0 = time.perf_counter()
    step()
    return {"which": which, "peak_rise_mib": round(peak.rise(), 1),
            "step_s": round(time.perf_counter() - t0, 3), "other_steps_s": round(plain, 3)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
        return
    print("| setting | peak RSS rise over step 10 (refreshing) | step 10 | steps 1-9, mean |")
    print("|---|---:|---:|---:|")
    for which in ("gram", "rows", "adamw"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.refresh_memory", "--one", which],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {which} | {r['peak_rise_mib']} MiB | {r['step_s']} s | "
              f"{r['other_steps_s']} s |", flush=True)


if __name__ == "__main__":
    main()
