"""Time the bit-budget solver on ExLlamaV2's SmolLM2 measurement and on a synthetic 80-layer model.

    python benchmarks/solver_bench.py [--measurement PATH] [--layers 80] [--repeat 3]

Prints one line per target bitrate (-b): best-of-``repeat`` wall time, total bits / budget,
loss (sum of 1 - accuracy) and the proven gap to the optimum (0 when optimal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exl2conv.solver import solve  # noqa: E402

SHARED = Path(os.environ.get("EXL2CONV_SHARED", REPO.parent / "shared"))
DEFAULT_MEASUREMENT = SHARED / "fixtures" / "smollm2-135m" / "exllamav2-0.3.2_measurement.json"

# SmolLM2-135M: 30 layers of these decoder linears, (K, N) each.
SMOL_LAYERS = 30
SMOL_NUMEL_PER_LAYER = sum(k * n for k, n in [(576, 576), (576, 192), (576, 192), (576, 576),
                                              (576, 1536), (576, 1536), (1536, 576)])


def load_slots(path: Path) -> list[list[tuple[int, float]]]:
    """Two slots per layer (attention, then MLP) of (total_bits, 1 - accuracy)."""
    data = json.loads(path.read_text())["measurement"]
    layers = sorted({int(k.split(".")[2]) for k in data if k.startswith("model.layers.")})
    return [[(int(e["total_bits"]), 1.0 - e["accuracy"]) for e in data[f"model.layers.{i}.{kind}"]]
            for i in layers for kind in ("self_attn", "mlp")]


def synthetic(slots, layers: int, seed: int = 0):
    """``layers`` layers cycling through the measured ones, losses scaled by seeded factors."""
    rng = np.random.default_rng(seed)
    per_layer = len(slots) // 2
    out = []
    for i in range(layers):
        for kind in range(2):
            src = slots[2 * (i % per_layer) + kind]
            scale = rng.uniform(0.8, 1.25, len(src))
            out.append([(c, l * float(f)) for (c, l), f in zip(src, scale)])
    return out


def bench(name: str, slots, numel: int, bits_list, repeat: int) -> float:
    print(f"\n{name}: {len(slots)} slots, {numel} weights")
    print(f"{'-b':>5} {'time ms':>9} {'bits/budget':>12} {'loss':>12} {'gap':>9}")
    total, slowest = 0.0, 0.0
    for bits in bits_list:
        budget = int(numel * bits)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            sol = solve(slots, budget)
            best = min(best, time.perf_counter() - start)
        total, slowest = total + best, max(slowest, best)
        print(f"{bits:5.2f} {best * 1e3:9.1f} {sol.total_bits / budget:12.6f} {sol.loss:12.6f} {sol.gap:9.2g}")
    print(f"total {total:.2f} s, slowest solve {slowest * 1e3:.1f} ms")
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurement", type=Path, default=DEFAULT_MEASUREMENT)
    ap.add_argument("--layers", type=int, default=80, help="layers of the synthetic model")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if not args.measurement.is_file():
        print(f"error: {args.measurement} not found; pass --measurement", file=sys.stderr)
        return 1
    bits_list = [2.5 + 0.25 * i for i in range(23)]
    slots = load_slots(args.measurement)
    per_layer = SMOL_NUMEL_PER_LAYER
    bench("SmolLM2-135M (ExLlamaV2 measurement)", slots, per_layer * len(slots) // 2, bits_list, args.repeat)
    big = synthetic(slots, args.layers)
    bench(f"synthetic {args.layers} layers", big, per_layer * args.layers, bits_list, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
