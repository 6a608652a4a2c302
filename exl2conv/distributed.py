"""Several processes on one job, through torch.distributed: who this process is (:class:`World`),
the collectives the job needs, and failing fast (docs/distributed.md).

One process (no ``-d``, or ``-d`` with one device) runs under :data:`SINGLE`, which has no process
group and whose helpers return at once: today's path, unchanged. Otherwise every rank joins one
process group (NCCL between GPUs, gloo between CPU processes) with a timeout, and every collective
goes through :meth:`World._collective`: an error there (a peer that died closes its connection;
a peer that hangs runs into the timeout) becomes :class:`PeerLost`, one line and
:data:`errors.EXIT_PEER`, never a hang or a traceback.

Results never depend on timing: work is divided by :meth:`World.owners`, a fixed function of the
items' costs and the device ratios, and gathered in rank order, so every rank assembles the same
values in the same order whatever finished first.
"""

from __future__ import annotations

import functools
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

from exl2conv.errors import EXIT_PEER, Exl2Error


class PeerLost(Exl2Error):
    """A collective failed: another rank died, failed or stopped answering."""

    exit_code = EXIT_PEER


@dataclass
class World:
    """This process's place in the job. rank 0 is the main rank: the only one that writes into the
    working folder. ratios: each rank's relative speed (-dr), for dividing work."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None
    ratios: tuple[float, ...] = (1.0,)
    supervised: bool = False
    timeout: float = 0.0
    _released: bool = field(default=False, repr=False)

    def __post_init__(self):
        if len(self.ratios) != self.size:
            self.ratios = (1.0,) * self.size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shared(self) -> bool:
        """Whether other ranks share the work (a process group exists)."""
        return self.size > 1

    def label(self) -> str:
        return f"rank {self.rank} of {self.size}" if self.shared else ""

    # -- dividing work ----------------------------------------------------------------------------

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that does each item: in the items' order, each goes to the rank whose load,
        this item included, divided by its ratio is least (ties to the lower rank). A fixed
        function of ``costs`` and the ratios, the same on every rank."""
        if not self.shared:
            return [0] * len(costs)
        load = [0.0] * self.size
        out = []
        for cost in costs:
            rank = min(range(self.size), key=lambda r: ((load[r] + cost) / self.ratios[r], r))
            load[rank] += cost
            out.append(rank)
        return out

    def share_rows(self, count: int, compute: Callable[[list[int]], torch.Tensor], what: str) -> torch.Tensor:
        """Rows ``0 .. count - 1`` of equal cost divided among the ranks (:meth:`owners`): each rank
        computes its own with ``compute(indices)`` (a tensor ``[len(indices), ...]`` on the CPU), and
        every rank gets all of them, ``[count, ...]`` in row order. One process computes them all."""
        if not self.shared:
            return compute(list(range(count)))
        owner = self.owners([1.0] * count)
        mine = [i for i, r in enumerate(owner) if r == self.rank]
        shares = self.all_gather(compute(mine) if mine else None, what)
        taken = [0] * self.size
        rows = []
        for r in owner:
            rows.append(shares[r][taken[r]])
            taken[r] += 1
        return torch.stack(rows)

    # -- collectives ------------------------------------------------------------------------------

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, ConnectionError) as exc:  # torch.distributed.DistError is a RuntimeError
            raise PeerLost(f"lost contact with another rank during {what} ({_reason(exc)}); the rank that failed "
                           "says why; run the same command to resume") from None

    def all_gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, in rank order (picklable; tensors on the CPU)."""
        if not self.shared:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank (the others' ``obj`` is ignored)."""
        if not self.shared:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def barrier(self, what: str) -> None:
        if self.shared:
            self.all_gather(None, what)  # gloo's and NCCL's barrier differ; a gather is the same everywhere

    # -- leading the other ranks through the job's stages (rank 0) ---------------------------------

    def lead(self, stage: str, shared_stages: Sequence[str], order: Sequence[str]) -> None:
        """Rank 0, before running ``stage``: the other ranks run it too when it is one of
        ``shared_stages``; past the last of them they are released (:meth:`release`)."""
        if not self.shared or not self.is_main or self._released:
            return
        if stage in shared_stages:
            self.broadcast(stage, f"the start of stage {stage}")
        elif order.index(stage) > max(order.index(s) for s in shared_stages):
            self.release()

    def release(self) -> None:
        """Rank 0: the other ranks have no more work in this job and may exit (once)."""
        if self.shared and self.is_main and not self._released:
            self._released = True
            self.broadcast(None, "the end of the shared stages")


def _reason(exc: BaseException) -> str:
    """The first sentence of a collective's error, without the source location gloo puts first
    ("[.../pair.cc:553] Connection closed by peer [127.0.0.1]:3504. This is typically ...")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return text.split(". ")[0][:160] or exc.__class__.__name__


SINGLE = World()

# per thread: a test runs two ranks as two threads of one process (tests/unit/test_distributed.py)
_local = threading.local()


def _in_use() -> list[World]:
    if not hasattr(_local, "worlds"):
        _local.worlds = []
    return _local.worlds


def active() -> World:
    """The world code should act on now (:data:`SINGLE` outside :func:`use`)."""
    worlds = _in_use()
    return worlds[-1] if worlds else SINGLE


@contextmanager
def use(world: World) -> Iterator[World]:
    _in_use().append(world)
    try:
        yield world
    finally:
        _in_use().pop()


def main_only(fn: Callable) -> Callable:
    """``fn`` where it runs on rank 0; on the other ranks a call that does nothing (rank 0 alone
    writes into the working folder)."""
    @functools.wraps(fn)
    def on_main(*args, **kwargs):
        return fn(*args, **kwargs) if active().is_main else None
    return on_main


def start(rank: int, size: int, device: torch.device, ratios: Sequence[float], supervised: bool,
          timeout: float) -> World:
    """Join the job's process group (MASTER_ADDR and MASTER_PORT from the environment, as torchrun
    sets them): NCCL for a CUDA device, gloo for the CPU; every collective waits ``timeout`` s."""
    import torch.distributed as dist

    world = World(rank, size, device, tuple(float(r) for r in ratios), supervised, timeout)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout), device_id=device if cuda else None)
    except (RuntimeError, ValueError, ConnectionError) as exc:
        raise PeerLost(f"could not join the other {size - 1} ranks ({str(exc).strip()[:160]}); check "
                       "MASTER_ADDR and MASTER_PORT and that every rank was started") from None
    return world


def stop(world: World) -> None:
    """Leave the process group after a successful job."""
    if world.shared:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
