"""The machine's roofs, measured in the same run as the benchmark, and the work a forward does.

Compute roof: torch's float32 matmul of two 2048 x 2048 matrices (2 * 2048^3 flops), the best
GFLOP/s this machine's BLAS reaches at the thread count. Bandwidth roof: a copy of a 256 MiB
float32 tensor into another (read + write, 512 MiB moved), in GB/s (10^9 bytes). Both take
the median of `repeat` timed runs after one warmup, at the thread count given.

A prefill's achieved GFLOP/s is forward_flops / prefill time, as a share of the compute roof.
A decode step reads every weight once whatever the batch, so its achieved bandwidth is
weight_bytes_per_step (in the dtype the weights are held in) / step time, as a share of the
bandwidth roof.
"""

from __future__ import annotations

import math
import statistics
import time

from ..config import ModelConfig
from ..formatspec import STORAGE_DTYPES_SPEC

GEMM_N = 2048
COPY_FLOATS = 64 * 1024 * 1024  # 256 MiB of float32


def _median_ms(fn, repeat: int) -> tuple[float, list[float]]:
    fn()  # warmup
    samples = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), samples


def measure_roofs(threads: int | None = None, repeat: int = 5, gemm_n: int = GEMM_N,
                  copy_floats: int = COPY_FLOATS) -> dict:
    """{threads, sgemm_gflops, copy_gbs, sgemm_ms, copy_ms} (the samples in ms) at `threads`
    (None: torch's current setting, left unchanged). The sizes are for tests only: smaller
    ones measure caches, not the machine."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    a, b = torch.randn(gemm_n, gemm_n), torch.randn(gemm_n, gemm_n)
    gemm_ms, gemm_samples = _median_ms(lambda: torch.mm(a, b), repeat)
    del a, b
    src = torch.randn(copy_floats)
    dst = torch.empty_like(src)
    copy_ms, copy_samples = _median_ms(lambda: dst.copy_(src), repeat)
    del src, dst
    return {"threads": torch.get_num_threads(),
            "sgemm_gflops": 2 * gemm_n ** 3 / gemm_ms * 1e-6,
            "copy_gbs": 2 * copy_floats * 4 / copy_ms * 1e-6,  # read + write
            "sgemm_ms": gemm_samples, "copy_ms": copy_samples}


def forward_flops(cfg: ModelConfig, B: int, S: int, past: int = 0) -> float:
    """Floating-point operations (a multiply-add is 2) of a forward of S new tokens per row
    after `past` cached ones: every matmul, the head over every position, and attention
    (q.k and p.v, 2 x head_dim each per query-key pair); norms and softmax are left out."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    matmul_params = L * (H * (q_dim + 2 * kv_dim) + q_dim * H + 3 * H * I) + V * H
    pairs = S * past + S * (S + 1) / 2  # query i sees past + i + 1 keys
    attention = L * 4 * cfg.head_dim * cfg.num_attention_heads * B * pairs
    return 2 * B * S * matmul_params + attention


def weight_bytes_per_step(cfg: ModelConfig, weight_dtype: str = "float32",
                          block_size: int = 32) -> float:
    """Bytes of weights one decode step streams: every matrix once, the head included (the
    embedding lookup reads one row a token, left out), stored as weight_dtype: 4 bytes a
    weight (float32), 2 (float16, bfloat16), or 1 plus a 4-byte scale per block_size weights
    of a row (int8)."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    # (rows, cols) of every matrix a step reads
    shapes = [(q_dim, H), (kv_dim, H), (kv_dim, H), (H, q_dim), (I, H), (I, H), (H, I)] * L + [(V, H)]
    itemsize = STORAGE_DTYPES_SPEC[weight_dtype]["itemsize"]
    total = 0.0
    for rows, cols in shapes:
        total += rows * cols * itemsize
        if weight_dtype == "int8":
            total += 4.0 * rows * math.ceil(cols / min(block_size, cols))
    return total
