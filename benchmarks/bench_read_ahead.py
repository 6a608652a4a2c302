"""Reading a model's weights from a cold disk, with and without reading ahead (CPU only).

    python benchmarks/bench_read_ahead.py                       # a random 6-layer model, 2048 wide
    python benchmarks/bench_read_ahead.py --model DIR --compute 2.0

Each conversion pass reads the model one module at a time (attention, MLP, next layer...). While a
module computes, exl2conv reads the next module's tensors on a background thread
(``WeightIndex.read_ahead``), so the pass waits on the disk only for the first module. This bench
drops the model's files from the page cache (``posix_fadvise(DONTNEED)``, which needs no root for
files with nothing unwritten), then walks the modules as a pass does, standing in for each
module's compute with ``--compute`` seconds of sleep (the GPU's time; the host thread is free),
once with reading ahead off and once on, and prints the time spent waiting for weights, beside
the same walk over files already in the page cache (the cost of making tensors of the bytes).
The figures depend on the disk: a fast NVMe drive saves little, a network volume much.

A pass on a GPU is bound by the host thread that launches its kernels, so the bench also times
such a thread (``--ops`` tiny torch operations) alone and beside the read-ahead thread re-reading
the cached model over and over: far more reading than a pass asks for (one module per module).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_model(path: Path, layers: int, hidden: int, intermediate: int) -> Path:
    """A random Llama-shaped float16 model (byte-level tokenizer of the tests' tiny models)."""
    from tests.tinymodel import make_tiny_llama

    if not (path / "config.json").exists():
        make_tiny_llama(path, layers=layers, hidden=hidden, intermediate=intermediate, heads=hidden // 64,
                        kv_heads=hidden // 64)
    for f in path.glob("*.safetensors"):  # flushed, so that dropping it from the cache works
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return path


def drop_from_cache(model: Path) -> None:
    for f in model.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def walk(model: Path, compute: float, ahead: bool, cold: bool = True) -> tuple[float, float]:
    """(seconds waiting for weights, wall seconds) of one pass over the layers' modules, from a
    cold page cache (or with the files already cached: the cost of turning bytes into tensors)."""
    from exl2conv.model import WeightIndex, load_config
    from exl2conv.model import forward

    cfg, index = load_config(model), WeightIndex(model)
    if not ahead:
        index.ahead = None
    if cold:
        drop_from_cache(model)
    waited = 0.0
    t0 = time.monotonic()
    for i in range(cfg.num_layers):
        for part in ("attn", "mlp"):
            t = time.monotonic()
            forward.load_layer_weights(index, cfg, i, part)
            waited += time.monotonic() - t
            time.sleep(compute)
    return waited, time.monotonic() - t0


def launches(n: int) -> float:
    """Seconds for ``n`` tiny in-place torch operations: a host thread busy as a GPU pass's is."""
    import torch

    x = torch.zeros(16)
    t = time.monotonic()
    for _ in range(n):
        x.add_(1)
    return time.monotonic() - t


def beside_read_ahead(model: Path, ops: int) -> tuple[float, int]:
    """(seconds for the operations, bytes read meanwhile) with the read-ahead thread re-reading
    every tensor of ``model`` (cached) back to back."""
    import threading

    from exl2conv.model import WeightIndex

    index = WeightIndex(model)
    names = list(index.entries)
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            index.read_ahead(names)
            index.ahead.wait_idle()

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        took = launches(ops)
    finally:
        stop.set()
        feeder.join()
    return took, index.ahead.bytes_read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model folder (default: a random one, written once)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--compute", type=float, default=0.5, help="seconds each module computes (sleep)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ops", type=int, default=100_000, help="tiny torch operations of the host-thread test")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "exl2conv-bench-read-ahead")
    a = ap.parse_args()
    if not hasattr(os, "posix_fadvise"):
        sys.exit("this bench needs os.posix_fadvise (Linux) to drop files from the page cache")
    model = a.model or make_model(a.work / f"llama-{a.layers}x{a.hidden}x{a.intermediate}", a.layers, a.hidden,
                                  a.intermediate)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30
    print(f"{model}: {size:.2f} GiB of safetensors; {a.compute} s of compute per module\n")
    print(f"{'run':>4} {'read ahead':>10} {'waiting s':>10} {'wall s':>8}")
    best = {}
    for r in range(a.repeat):
        for ahead in (False, True):
            waited, wall = walk(model, a.compute, ahead)
            best[ahead] = min(best.get(ahead, waited), waited)
            print(f"{r + 1:>4} {'on' if ahead else 'off':>10} {waited:>10.3f} {wall:>8.2f}")
    warm = min(walk(model, a.compute, False, cold=False)[0] for _ in range(a.repeat))
    print(f"\nwaiting for weights, best of {a.repeat}: {best[False]:.3f} s off, {best[True]:.3f} s on; "
          f"{warm:.3f} s with the files already in the page cache (reading no disk)")
    print(f"\n{a.ops} tiny torch operations on the main thread, best of {a.repeat}:")
    alone = min(launches(a.ops) for _ in range(a.repeat))
    runs = [beside_read_ahead(model, a.ops) for _ in range(a.repeat)]
    took, nbytes = min(runs)
    print(f"  alone {alone:.3f} s; beside the read-ahead thread {took:.3f} s "
          f"(it read {nbytes / 2**30:.1f} GiB meanwhile)")


if __name__ == "__main__":
    main()
