"""How far a module's measurement on calibration rows divided among ranks lies from one
process's (docs/distributed.md, "Within float noise of one process"): the ranks run as threads of
this process (the unit tests' ThreadWorld), each on its own slice of the rows, the Hessians summed
in rank order.

    python benchmarks/rows_split_noise.py [--ranks 3] [--rows 7] [--tokens 32] [--chunk 3] [--seeds 4]

Prints, per seed and module, the largest Hessian difference and the largest accuracy difference
against one process, then the worst of each and the largest Hessian entry. Run from the
repository's root (it builds the tests' tiny Llama).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from exl2conv import distributed, measure
from exl2conv.layers import ModuleRun
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from tests.tinymodel import make_tiny_llama
from tests.unit.test_distributed import run_as_ranks


def measured(cfg, w, part: str, states: torch.Tensor, chunk: int):
    """This rank's view (``distributed.active()``): the module's entries and its Hessians."""
    rows = distributed.active().row_range(states.shape[0])
    mine = states[rows.start:rows.stop]
    run = ModuleRun(part, w, layer_linears(cfg, 0, part), cfg, forward.RotaryCache(cfg), chunk, 0)
    _, hess = measure.reference_pass(run, mine, part)
    entries = measure.measure_module(run, mine)[0]
    return entries, {k: h.h.clone() for k, h in hess.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--rows", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    src = make_tiny_llama(Path(tempfile.mkdtemp()) / "m", seed=1, hidden=64, intermediate=96, layers=1)
    cfg, index = load_config(src), WeightIndex(src)
    worst_acc = worst_h = largest = 0.0
    for seed in range(args.seeds):
        for part in ("attn", "mlp"):
            w = forward.load_layer_weights(index, cfg, 0, part, "cpu")
            states = torch.randn(args.rows, args.tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
            one = measured(cfg, w, part, states, args.chunk)
            ranks = run_as_ranks(lambda: measured(cfg, w, part, states, args.chunk), size=args.ranks)
            d_acc = max(abs(a["accuracy"] - b["accuracy"]) for a, b in zip(ranks[0][0], one[0]))
            d_h = max(float((ranks[0][1][k] - one[1][k]).abs().max()) for k in one[1])
            largest = max(largest, *(float(h.abs().max()) for h in one[1].values()))
            worst_acc, worst_h = max(worst_acc, d_acc), max(worst_h, d_h)
            print(f"seed {seed} {part}: Hessian difference {d_h:.3g}, accuracy difference {d_acc:.3g}")
    print(f"worst: Hessian difference {worst_h:.3g} (largest entry {largest:.4g}), accuracy difference {worst_acc:.3g}")


if __name__ == "__main__":
    main()
