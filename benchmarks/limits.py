"""Physical limits of this machine, measured in the run that compares against them.

- matmul peak: the median FLOP/s of square matmuls (fp32 and bf16) at the thread count in use, in
  the fastest of the layouts a linear layer's forward and backward use;
- memory read bandwidth: the median bytes/s of summing a tensor much larger than the caches.

Used by benchmarks/throughput.py (MFU of the update, decode against the weight-read bound).
"""

from __future__ import annotations

import statistics
import time

import torch


LAYOUTS = {
    # x @ W.T: every linear layer's forward (F.linear) and the weight gradient's transposed twin
    "nt": lambda a, b: torch.nn.functional.linear(a, b),
    # x.T @ W: the weight gradient (grad_out.T @ input)
    "tn": lambda a, b: a.t() @ b,
    # x @ W: the input gradient in the backward (grad_out @ weight)
    "nn": lambda a, b: a @ b,
}


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 7, layouts: tuple[str, ...] = ("nt", "tn")) -> float:
    """Median FLOP/s of an [n, n] x [n, n] product (2 n^3 FLOPs) in `dtype`, the best of `layouts`.

    The layout matters where a dtype has no optimised kernel: torch 2.13 on an AVX2-only CPU runs
    bf16 `x @ W.T` at about a quarter of fp32's speed but bf16 `x @ W` about 100x slower still.
    The peak is what the fastest layout reaches; `matmul_layouts` reports each one.
    """
    return max(matmul_layouts(dtype, n, repeats, layouts).values())


def matmul_layouts(dtype: torch.dtype, n: int = 2048, repeats: int = 7, layouts: tuple[str, ...] = ("nt", "tn", "nn")) -> dict:
    """Median FLOP/s of each layout in `layouts` (see LAYOUTS); a layout whose first call takes more
    than a second is timed once more only."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = {}
    for name in layouts:
        f = LAYOUTS[name]
        t0 = time.perf_counter()
        f(a, b)  # warm-up: thread pool, kernel selection
        times = []
        for _ in range(repeats if time.perf_counter() - t0 < 1.0 else 1):
            t0 = time.perf_counter()
            f(a, b)
            times.append(time.perf_counter() - t0)
        out[name] = 2 * n**3 / statistics.median(times)
    return out


def median_time(fn, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls of `fn` after one warm-up call, the last call's result)."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def read_bandwidth(mbytes: int = 512, repeats: int = 7) -> float:
    """Median bytes/s of reading a float32 tensor of `mbytes` MB once (a sum)."""
    x = torch.ones(mbytes * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def llama_train_flops(config, tokens: int, scored: int) -> float:
    """FLOPs of one forward + backward of a Llama over `tokens` positions of which `scored` get
    logits (the LM head runs only there): 6 x (matrix parameters of the blocks x tokens + LM head
    x scored) plus attention scores (12 x layers x tokens x context x hidden / 2, causal)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    d, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    block = d * d * 2 + d * kv * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    return 6 * (layers * block * tokens + d * c.vocab_size * scored)


def attention_flops(config, rows: int, length: int) -> float:
    """Forward + backward FLOPs of causal attention scores and values: 3 x 2 x 2 x L^2/2 x d per layer."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    return 3 * 2 * 2 * rows * length * length / 2 * c.hidden_size * c.num_hidden_layers
