"""Cost of a 3x3 convolution's K-FAC input statistics (aᵀa, Σa and the check's probes, an
`InputGram`; ALGORITHMS.md §2.1 "Input rows reduced early") from its unfolded patches
(`grng_torch.layers.conv.input_rows`, then `input_gram.reduce_rows`) and from its padded input
without patches (`grng_core.structures.conv_gram`), on the benchmark ResNet-BN's layers and a
CIFAR-sized one; one torch thread, float32, median of repeated calls.

    python -m benchmarks.conv_gram_cost
"""

from __future__ import annotations

import functools
import statistics
import time

SHAPES = [(64, 16, 16, 16), (64, 32, 8, 8), (64, 64, 32, 32)]  # (B, C, H, W), C → C, 3x3


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    import array_api_compat
    import torch
    from torch import nn


    torch.set_num_threads(1)
    print("| input (B, C, H, W), 3x3, padding 1 | patches then aᵀa | without patches | ratio |")
    print("|---|---:|---:|---:|")
    for shape in SHAPES:
        m = nn.Conv2d(shape[1], shape[1], 3, padding=1, bias=False)
        x = torch.randn(shape)
        xp = array_api_compat.array_namespace(x)
        repeat = 5 if shape[1] >= 64 else 20
        rows = functools.partial(_from_rows, m, x, xp)
        direct = functools.partial(_direct, m, x, xp)
        a, b = _median_ms(rows, repeat), _median_ms(direct, repeat)
        print(f"| {shape} | {a:.2f} ms | {b:.2f} ms | {a / b:.2f}x |", flush=True)


def _from_rows(m, x, xp):
    import torch
    from grng_torch.layers import conv

    from grng_core.structures import input_gram

    return input_gram.reduce_rows(conv.input_rows(m, x), False, xp, torch.float32)


def _direct(m, x, xp):
    import torch
    from grng_torch.layers import conv

    from grng_core.structures.conv_gram import conv_input_gram

    return conv_input_gram(conv.padded_input(m, x), (3, 3), (1, 1), False, xp, torch.float32)


if __name__ == "__main__":
    main()
