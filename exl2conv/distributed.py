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

    def row_range(self, count: int) -> range:
        """This rank's calibration rows of a set of ``count``: a contiguous slice, the slices in
        rank order and sized by the ratios (each rank at least one row: :class:`Exl2Error` when
        there are fewer rows than ranks). A fixed function of ``count`` and the ratios."""
        if not self.shared:
            return range(count)
        if count < self.size:
            raise Exl2Error(f"{count} calibration rows for {self.size} ranks: each rank needs at least one; give "
                            "more rows (-mr, -r) or fewer devices")
        total = sum(self.ratios)
        spare = count - self.size  # one row each, then the rest by the ratios
        ends = [r + 1 + round(spare * sum(self.ratios[:r + 1]) / total) for r in range(self.size)]
        return range(ends[self.rank - 1] if self.rank else 0, ends[self.rank])

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

    def _wire(self) -> torch.device:
        """Where tensors go through the process group: the CUDA device under NCCL, else the CPU."""
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    def _gather_equal(self, x: torch.Tensor, what: str, to_main: bool = False) -> list[torch.Tensor] | None:
        """Every rank's ``x`` (all of one shape), in rank order, on the wire device (rank 0 alone
        with ``to_main``: the others get None)."""
        import torch.distributed as dist

        x = x.to(self._wire()).contiguous()
        if to_main:
            parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_main else None
            self._collective(what, lambda: dist.gather(x, parts, dst=0))
            return parts
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._collective(what, lambda: dist.all_gather(parts, x))
        return parts

    def gather_tensors(self, t: torch.Tensor, what: str, to_main: bool = False,
                       step_bytes: int | None = None) -> list[torch.Tensor] | None:
        """Every rank's ``t`` ``[n_rank, ...]`` (the first dimension may differ between ranks, the
        others may not), in rank order, on ``t``'s device: tensors through the process group (no
        pickling), padded to the longest. ``to_main``: rank 0 alone gets them, the others None.
        ``step_bytes``: at most this much of each rank's rows at a time goes through the wire
        device (a GPU under NCCL), for rows that live in host memory because they do not fit it."""
        if not self.shared:
            return [t]
        sizes = [int(n) for n in self._gather_equal(torch.tensor([t.shape[0]], dtype=torch.int64), what)]
        longest = max(sizes)
        row_bytes = max(1, t[0].numel() * t.element_size()) if t.dim() > 0 and t.shape[0] else 1
        step = longest if step_bytes is None else max(1, step_bytes // row_bytes)
        pieces: list[list[torch.Tensor]] = [[] for _ in range(self.size)]
        for r0 in range(0, max(longest, 1), max(step, 1)):
            n = min(step, longest - r0)
            piece = t[r0:r0 + n]
            if piece.shape[0] < n:
                piece = torch.cat([piece, t.new_zeros((n - piece.shape[0], *t.shape[1:]))])
            parts = self._gather_equal(piece, what, to_main)
            if parts is not None:
                for r, p in enumerate(parts):
                    pieces[r].append(p[:max(0, min(n, sizes[r] - r0))].to(t.device))
        if to_main and not self.is_main:
            return None
        return [torch.cat(p) if len(p) > 1 else p[0] for p in pieces]

    def gather_rows(self, t: torch.Tensor, what: str, to_main: bool = False,
                    step_bytes: int | None = None) -> torch.Tensor | None:
        """The ranks' rows ``t`` ``[n_rank, ...]`` one after another in rank order: the whole set's
        ``[sum n_rank, ...]`` (rank 0 alone with ``to_main``; ``step_bytes``: see
        :meth:`gather_tensors`)."""
        parts = self.gather_tensors(t, what, to_main, step_bytes)
        return None if parts is None else torch.cat(parts) if len(parts) > 1 else parts[0]

    def sum_in_order(self, t: torch.Tensor, what: str, chunk_bytes: int = 64 << 20) -> torch.Tensor:
        """``t`` replaced, in place, by the sum of every rank's ``t`` (all of one shape), added in
        rank order in ``t``'s dtype: the same bits on every rank and in every run, whatever the
        timing (a backend's all-reduce promises no order). A slice of rows at a time, so that the
        gathered copies take ``size x chunk_bytes``, not ``size`` whole matrices."""
        if not self.shared:
            return t
        flat = t.view(t.shape[0], -1) if t.dim() > 1 else t.view(-1, 1)
        step = max(1, chunk_bytes // max(1, flat.shape[1] * flat.element_size()))
        for r0 in range(0, flat.shape[0], step):
            parts = self._gather_equal(flat[r0:r0 + step], what)
            acc = parts[0].clone()
            for p in parts[1:]:
                acc += p
            flat[r0:r0 + step] = acc.to(flat.device)
        return t

    def _broadcast_bytes(self, buf: torch.Tensor, src: int, what: str) -> None:
        """Rank ``src``'s bytes ``buf`` (uint8, 1-D, of one length on every rank) into every rank's ``buf``."""
        import torch.distributed as dist

        wire = buf if buf.device == self._wire() else buf.to(self._wire())
        self._collective(what, lambda: dist.broadcast(wire, src=src))
        if wire is not buf and self.rank != src:
            buf.copy_(wire)

    def share(self, mine: Sequence[Sequence[Any]], what: str, device: torch.device,
              step_bytes: int = 256 << 20) -> list[list[list[Any]]]:
        """Every rank's items, in rank order: ``mine`` is this rank's, each item a list of tensors
        and small picklable values. The tensors travel through tensor collectives (no pickling:
        each rank's packed into one byte buffer on ``device`` and broadcast from it, ``step_bytes``
        at a time through the wire device, so that a GPU under NCCL never holds a whole buffer
        from host memory); the other values and the tensors' shapes and dtypes go in one small
        object gather first. This rank's items come back as given; another rank's tensors as
        contiguous views of one buffer on ``device`` (clone one to keep it apart from the others)."""
        if not self.shared:
            return [[list(item) for item in mine]]
        layout, nbytes = _layout(mine)
        layouts = self.all_gather((layout, nbytes), what)
        out: list[list[list[Any]]] = []
        for r, (lay, n) in enumerate(layouts):
            if r == self.rank:
                buf = _packed(mine, lay, n, device) if n else None
            else:
                buf = torch.empty(n, dtype=torch.uint8, device=device) if n else None
            for a in range(0, n, step_bytes):
                self._broadcast_bytes(buf[a:a + step_bytes], r, what)
            out.append([list(item) for item in mine] if r == self.rank else _unpacked(buf, lay, device))
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


# -- items of tensors packed into one byte buffer (World.share) ----------------------------------------

_ALIGN = 16  # each tensor's bytes start at a multiple of this, so that a view of any dtype is allowed


def _layout(items: Sequence[Sequence[Any]]) -> tuple[list[list[Any]], int]:
    """Each item's entries as ("t", shape, dtype, offset, nbytes) for a tensor or ("v", value),
    and the buffer's length."""
    out, pos = [], 0
    for item in items:
        entries = []
        for x in item:
            if isinstance(x, torch.Tensor):
                n = x.numel() * x.element_size()
                entries.append(("t", tuple(x.shape), x.dtype, pos, n))
                pos += -(-n // _ALIGN) * _ALIGN
            else:
                entries.append(("v", x))
        out.append(entries)
    return out, pos


def _packed(items: Sequence[Sequence[Any]], layout: list[list[Any]], nbytes: int, device: torch.device
            ) -> torch.Tensor:
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)  # zeros: the alignment gaps too are fixed bytes
    for item, entries in zip(items, layout):
        for x, e in zip(item, entries):
            if e[0] == "t" and e[4]:
                buf[e[3]:e[3] + e[4]].copy_(x.contiguous().reshape(-1).view(torch.uint8))
    return buf


def _unpacked(buf: torch.Tensor | None, layout: list[list[Any]], device: torch.device) -> list[list[Any]]:
    out = []
    for entries in layout:
        item = []
        for e in entries:
            if e[0] == "v":
                item.append(e[1])
            elif e[4] == 0:
                item.append(torch.empty(e[1], dtype=e[2], device=device))
            else:
                item.append(buf[e[3]:e[3] + e[4]].view(e[2]).view(e[1]))
        out.append(item)
    return out


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
