"""Float32 causal attention, forward and backward, on a GPU: the passes' blocked attention
(exl2conv.model.attention_kernels.BlockedAttention) against PyTorch's kernels.

    python benchmarks/bench_attention.py

For each shape (SmolLM2's 9 heads x 64 at 7 and 16 rows, Llama-2-7B's 32 heads x 128 at one row,
all 2048 tokens) prints one JSON line per variant: milliseconds per forward and backward, whether
two runs gave the same bits, the relative difference from the math kernels, and peak memory.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from exl2conv.model import attention_kernels


def step(variant: str, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if variant in ("math", "efficient", "efficient_deterministic"):
        backend = SDPBackend.MATH if variant == "math" else SDPBackend.EFFICIENT_ATTENTION
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.use_deterministic_algorithms(variant == "efficient_deterministic")
        try:
            out.backward(grad)
        finally:
            torch.use_deterministic_algorithms(False)
    elif variant.startswith("blocked"):
        attention_kernels.BLOCK = int(variant.split("_")[1])
        out = attention_kernels.BlockedAttention.apply(q, k, v, None)
        out.backward(grad)
    else:  # float16 flash, the EXL2CONV_HALF_ATTENTION path
        out = attention_kernels.HalfAttention.apply(q, k, v, None)
        out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def bench(shape, variants, reps=5):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(*shape, device="cuda", generator=gen) for _ in range(4))
    ref = step("math", q, k, v, grad)
    for variant in variants:
        runs = [step(variant, q, k, v, grad) for _ in range(2)]
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        diff = max(float((a - b).norm() / b.norm()) for a, b in zip(runs[0], ref))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(reps):
            step(variant, q, k, v, grad)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / reps * 1e3
        print(json.dumps({"shape": list(shape), "variant": variant, "ms": round(ms, 2), "same_bits": same,
                          "rel_diff_from_math": float(f"{diff:.2e}"),
                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # as the passes run (layers.module_matmuls)
    variants = ["math", "efficient", "efficient_deterministic", "blocked_256", "blocked_512", "blocked_1024",
                "half"]
    bench((7, 9, 2048, 64), variants)
    bench((16, 9, 2048, 64), variants)
    bench((1, 32, 2048, 128), variants)


if __name__ == "__main__":
    main()
