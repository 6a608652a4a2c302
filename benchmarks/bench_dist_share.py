"""How long every rank takes to get every rank's candidates, and at what host memory: pickled
through ``all_gather_object`` (the way before ``World.share``) against ``World.share``'s tensor
broadcasts of byte buffers (docs/distributed.md). Two gloo ranks on this host, each with its share
of ``--mib`` MiB of measurement-like candidates (4 MiB of uint8 codes each, with their small
tensors), exchanged 3 times.

    python benchmarks/bench_dist_share.py [--mib 512]

Prints, per way, the seconds per exchange and rank 0's peak RSS. Run from the repository's root.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exl2conv import distributed  # noqa: E402


def rank_main(rank: int, size: int, way: str, mib: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    world = distributed.World(rank, size, torch.device("cpu"))
    k, n = 4096, 1024  # a candidate's codes: 4 MiB
    g = torch.Generator().manual_seed(rank)
    mine = [[torch.randint(0, 255, (k, n), dtype=torch.uint8, generator=g), torch.zeros(k, dtype=torch.int16),
             torch.rand(32, n, generator=g).half(), torch.zeros(k, dtype=torch.int64), torch.arange(k), n]
            for _ in range(mib // 4 // size)]
    world.barrier("the start")
    t0 = time.perf_counter()
    for _ in range(3):
        got = world.all_gather(mine, "pickled") if way == "pickled" else world.share(mine, "shared", world.device)
        del got
    took = (time.perf_counter() - t0) / 3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank == 0:
        print(f"{way}: {mib} MiB of candidates over {size} ranks: {took:.3f} s per exchange, "
              f"rank 0's peak RSS {rss:.0f} MiB", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    args = p.parse_args()
    from exl2conv.launch import free_port

    for way in ("pickled", "shared"):
        port = free_port()
        procs = [mp.get_context("spawn").Process(target=rank_main, args=(r, 2, way, args.mib, port)) for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()


if __name__ == "__main__":
    main()
