"""GPU and host memory: pinned host copies and the page-locked arena of the measurement's codes,
handing cached GPU memory back between phases, small device constants made once, and the copy
stream that overlaps host-to-GPU copies with compute (:class:`Prefetch`, :class:`Copier`).
"""

from __future__ import annotations

from collections import deque

import torch


def pinned_copy(t: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
    """A copy of GPU tensor ``t`` in pinned host memory; ``non_blocking``: without a host sync
    (read it back on the same stream, or after a sync)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=non_blocking)


class HostArena:
    """Page-locked host memory handed out as consecutive tensors and taken back all at once.

    A large module's candidates keep their codes in host memory while the module's table is scored
    (:func:`exl2conv.measure.quantized_candidates`). One block per candidate from PyTorch's pinned
    allocator rounds each up to a power of two and keeps every size it has used: a Llama-2-7B
    MLP's 40 candidates of 43 MiB took 64 MiB blocks each and the attention's 57 of 16 MiB another
    0.9 GiB, 3.4 GiB page-locked in all, where one buffer of the largest module's 1.7 GiB serves
    every module in turn. Page-locking is the cost: 0.65-1.0 s per GiB on an H100 host, and it
    holds up the main thread either way (a second thread's page-locking of 3 GiB stalled the main
    thread's kernel launches for all of its 3.3 s).

    nbytes: the buffer's size (:func:`exl2conv.measure.codes_sizes` plans it); pin: page-lock it
    (where there is a GPU; without, a plain buffer, for tests)."""

    ALIGN = 512  # bytes between the starts of consecutive tensors

    def __init__(self, nbytes: int, pin: bool = True):
        self.buf = torch.empty(nbytes, dtype=torch.uint8)
        self.pos = 0
        self.registered = self.pinned = False
        if pin and nbytes:
            self.buf.zero_()  # touched first, on all cores: the lock then only pins mapped pages
            if int(torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), nbytes, 0)) == 0:  # cudaSuccess
                self.registered = self.pinned = True
            else:  # not registrable here: PyTorch's pinned allocator instead
                self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self.pinned = True

    @staticmethod
    def size_for(sizes: list[int]) -> int:
        """Bytes that tensors of ``sizes`` bytes take one after another."""
        a = HostArena.ALIGN
        return sum(-(-n // a) * a for n in sizes)

    def reset(self) -> None:
        """Takes every tensor handed out back: the caller no longer reads them (the copies to the
        GPU still queued from them are waited for here)."""
        if self.pinned:
            torch.cuda.synchronize()
        self.pos = 0

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` (on a GPU: a host sync) in the next bytes of the buffer; past its
        end, a block of its own."""
        n = t.numel() * t.element_size()
        if self.pos + n > self.buf.numel():
            return pinned_copy(t, non_blocking=False) if self.pinned else t.to("cpu", copy=True)
        out = self.buf[self.pos:self.pos + n].view(t.dtype).view(t.shape)
        self.pos += -(-n // self.ALIGN) * self.ALIGN
        return out.copy_(t)

    def close(self) -> None:
        """Unpins the buffer (tensors still referencing it stay valid, in pageable memory)."""
        if self.registered:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.registered = False
        self.buf = torch.empty(0, dtype=torch.uint8)
        self.pos = 0
        self.pinned = False


RELEASE_BYTES = 256 << 20


def release_unused(dev: torch.device) -> None:
    """Unmaps the GPU memory that the caching allocator holds unused, when that is at least
    :data:`RELEASE_BYTES`: buffers of other sizes than the next phase's would otherwise sit beside
    its own, and add to the peak reserved memory. It costs a host sync and fresh mappings for the
    allocations after it, which add up where it runs often: callers use it only around buffers of
    that size (a small model, whose norm fits leave that much unused after every factor, converts
    about a fifth slower when the cache is released there: docs/performance.md)."""
    if dev.type == "cuda" and torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev) >= RELEASE_BYTES:
        torch.cuda.empty_cache()


def large_factor(k: int) -> bool:
    """Whether a ``[k, k]`` float32 matrix (a Hessian or its factor) is large enough that the cache
    is released around it (:func:`release_unused`): a Llama-2-7B down_proj's is 0.45 GiB."""
    return k * k * 4 >= RELEASE_BYTES


# Small index tensors on the device, made once per distinct key for the whole run: each is a copy
# from host memory, and such a copy waits for all queued GPU work (a host sync), which would stall the
# GPU thousands of times per model (the same keys recur in every layer).
_DEVICE_CONSTANTS: dict = {}
_CONSTANTS_MAX = 1 << 14


def device_constant(key, dev: torch.device, make):
    """``make()`` (tensors made on the CPU, moved to ``dev``), cached by ``(key, dev)``."""
    k = (key, str(dev))
    hit = _DEVICE_CONSTANTS.get(k)
    if hit is None:
        if len(_DEVICE_CONSTANTS) >= _CONSTANTS_MAX:
            _DEVICE_CONSTANTS.clear()
        hit = _DEVICE_CONSTANTS[k] = make()
    return hit


_SIDE: dict = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device for the whole run: memory the caching allocator holds for a
    stream serves only that stream, so a new stream per call would strand blocks in each."""
    key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(key)
    return _SIDE[key]


def release_cached(device: torch.device) -> None:
    """Hands the allocators' cached, unused memory back at a stage's end: the GPU's (the next
    stage's peak is then its own) and PyTorch's pinned host blocks, which it keeps for reuse in
    power-of-two sizes that one stage's buffers rarely share with the next's (kept, a 32-layer
    Llama-2-7B job's peak RSS was the sum of its stages': 18.9 GiB)."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return
    torch.cuda.synchronize(device)  # every pending copy done: its pinned block can go
    torch.cuda.empty_cache()
    accel = getattr(torch, "accelerator", None)
    host = getattr(accel, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if host is not None:
        host()


def side_copy(src: torch.Tensor, device: torch.device, side: torch.cuda.Stream) -> torch.Tensor:
    """A copy of host tensor ``src`` on ``device``, made on the ``side`` stream after the work
    queued so far on the current stream (record an event on ``side`` to wait for it). The copy
    lives in the current stream's memory pool: a copy allocated on the side stream would leave its
    memory in a pool of its own, unusable by the compute stream (0.25 GiB on a Llama-2-7B layer)."""
    main = torch.cuda.current_stream(device)
    out = torch.empty(src.shape, dtype=src.dtype, device=device)
    side.wait_stream(main)  # the block may have been freed by work still queued on main
    with torch.cuda.stream(side):
        out.copy_(src, non_blocking=True)
    out.record_stream(side)
    return out


class Prefetch:
    """Host tensors copied to a GPU one after the other, in the order they are taken: the next one
    on the side stream while the current one is used (:func:`side_copy`).

    The host waits until the GPU has finished all but the last :data:`AHEAD` items taken before
    it queues another copy. Unbounded, the host queued a whole module's copies at once, and an
    item's memory is only reused once the GPU has run its copy and the work using it: with the
    copies allocated on the side stream, that stream's pool grew to the size of all the states
    (3.5 GiB of a Llama-2-7B quantization pass, on top of the 3.7 GiB that the pass used)."""

    AHEAD = 2

    def __init__(self, items: list[torch.Tensor], device: torch.device):
        self.items, self.device, self.i = items, device, 0
        self.side = side_stream(device)
        self.next: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self.queued: deque = deque()  # per item taken: an event after the work queued before it

    def _fetch(self) -> None:
        self.next = None
        if self.i < len(self.items):
            self.next = (side_copy(self.items[self.i], self.device, self.side), self.side.record_event())
            self.i += 1

    def take(self) -> torch.Tensor:
        """The next item on the device, ready for the current stream to use."""
        if self.i == 0:
            self._fetch()
        x, ready = self.next
        main = torch.cuda.current_stream(self.device)
        self.queued.append(main.record_event())
        while len(self.queued) > self.AHEAD:
            self.queued.popleft().synchronize()
        main.wait_event(ready)
        self._fetch()
        return x


class Copier:
    """The chunks of :func:`exl2conv.layers.run_block`, taken in order: views of ``states`` and ``out`` where they
    live on the device the module runs on; where they live in (pinned) host memory and the module
    on a GPU, copies on a side stream that overlap the module's compute: the next chunk comes in
    while this one runs (:class:`Prefetch`), and outputs go back while the next one runs."""

    def __init__(self, states: torch.Tensor, out: torch.Tensor | None, device: torch.device | None, chunk: int):
        self.states, self.out, self.chunk = states, out, chunk
        self.device = device if device is not None and states.device != device else None
        self.side = side_stream(self.device) if self.device is not None and self.device.type == "cuda" else None
        self.rows = (Prefetch([states[r0:r0 + chunk] for r0 in range(0, states.shape[0], chunk)], self.device)
                     if self.side is not None else None)

    def rows_in(self, r0: int) -> torch.Tensor:
        if self.device is None:
            return self.states[r0:r0 + self.chunk]
        if self.side is None:
            return self.states[r0:r0 + self.chunk].to(self.device)
        return self.rows.take()

    def rows_out(self, r0: int, y: torch.Tensor) -> None:
        dst = self.out[r0:r0 + self.chunk]
        if self.side is None or y.device == dst.device:
            dst.copy_(y)
            return
        done = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.side):
            self.side.wait_event(done)
            dst.copy_(y, non_blocking=True)
        y.record_stream(self.side)  # not reused before the copy has read it

    def finish(self) -> None:
        """Waits for the side stream: the outputs are in host memory, ready to read."""
        if self.side is not None:
            self.side.synchronize()
