"""GPTQ as ExLlamaV2's AdaptiveGPTQ computes it, as pure torch functions (CPU or CUDA).

Shapes follow the reference's convention: a linear's HF weight ``W`` is ``[out, in]``; GPTQ works on
``Wt = W^T`` of shape ``[K, N]`` with K = in_features and N = out_features padded to a multiple of 32.
"Permuted" means rows of ``Wt`` reordered by the act-order permutation ``perm``.

Several candidate QParams of one linear are quantized together (:func:`quantize_many`): they share
the weight, the Hessian inverse and the row order, so one pass over the rows serves them all. The
arithmetic per row is ExLlamaV2's (reference 5.4-5.5); only the order in which the lazy block
updates are summed differs (spans of 128 rows, see :func:`_gptq_pass`, instead of each group),
which changes float32 rounding, not the maths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from exl2conv import kernels, settings, stop
from exl2conv.errors import Exl2Error
from exl2conv.pack import dequant, dequant_scale
from exl2conv.qparams import Group, QParams

PERCDAMP = 0.12
DAMP_MIN = 1e-5
DAMP_RETRIES = 10
P_GRID = torch.linspace(0.70, 1.20, 97, dtype=torch.float64)  # exact 0.70 + 0.50 * j / 96
ERR_NORM = 3.5
BLOCK = 32  # every group boundary is a multiple of 32 rows
SPAN = 128  # rows whose errors update the later rows in one product (see _gptq_pass)


def qzero(bits: int) -> int:
    return 1 << (bits - 1)


def maxq(bits: int) -> int:
    return (1 << bits) - 1


# -- Hessian ----------------------------------------------------------------------------------------


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


class Hessian:
    """Accumulates ``X^T X`` in float32 over calibration rows (one call per row)."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x: ``[..., K]``, any float dtype; counted as one row (batch) of calibration data."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.h.device, dtype=torch.float32)
        self.h.addmm_(x.T, x)
        self.rows += 1

    def add_rows(self, x: torch.Tensor) -> None:
        """x: ``[B, L, K]``: B calibration rows at once (same result as B calls to :meth:`add`)."""
        flat = x.reshape(-1, x.shape[-1]).to(device=self.h.device, dtype=torch.float32)
        self.h.addmm_(flat.T, flat)
        self.rows += x.shape[0]

    def to(self, device: torch.device | str) -> "Hessian":
        """Moves the accumulator (to pinned host memory when it leaves a GPU for the CPU, without
        a host sync): a Hessian waiting for its turn need not hold GPU memory."""
        device = torch.device(device)
        if self.h.device != device:
            if device.type == "cpu" and self.h.is_cuda:
                self.h = pinned_copy(self.h)
            else:
                self.h = self.h.to(device, non_blocking=True)
        return self

    def normalized(self, in_place: bool = False) -> torch.Tensor:
        """H divided by the number of rows (ExLlamaV2 normalizes by rows, not tokens); the
        identity when no rows were seen. ``in_place``: divides the accumulator itself (no second
        ``[K, K]`` copy; the accumulator is then spent)."""
        if self.rows == 0:
            return torch.eye(self.h.shape[0], dtype=torch.float32, device=self.h.device)
        return self.h.div_(self.rows) if in_place else self.h / self.rows


@dataclass
class Prepared:
    """What quantizing a linear needs from its Hessian: the act-order permutation and the upper
    Cholesky factor ``U`` of the damped inverse (``H^-1 = U^T U``), in permuted order."""

    perm: torch.Tensor  # int64 [K]
    u: torch.Tensor     # float32 [K, K], upper triangular

    @property
    def invperm(self) -> torch.Tensor:
        return torch.argsort(self.perm)


RELEASE_BYTES = 256 << 20


def release_unused(dev: torch.device) -> None:
    """Unmaps the GPU memory that the caching allocator holds unused, when that is at least
    :data:`RELEASE_BYTES`: buffers of other sizes than the next phase's would otherwise sit beside
    its own, and add to the peak reserved memory. It costs a sync and fresh mappings after it:
    callers use it only around buffers of that size (done after every factor of SmolLM2-135M,
    whose norm fits leave that much unused, it slowed its job from 48 to 58 s; used only around
    large buffers, the job took 45 s: docs/performance.md, sessions 10 and 11)."""
    if dev.type == "cuda" and torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev) >= RELEASE_BYTES:
        torch.cuda.empty_cache()


def large_factor(k: int) -> bool:
    """Whether a ``[k, k]`` float32 matrix (a Hessian or its factor) is large enough that the cache
    is released around it (:func:`release_unused`): a Llama-2-7B down_proj's is 0.45 GiB."""
    return k * k * 4 >= RELEASE_BYTES


def prepare(h: "torch.Tensor | Hessian", name: str = "") -> Prepared:
    """Act-order permutation and damped inverse Cholesky factor of a normalized Hessian ``[K, K]``,
    or of a :class:`Hessian` accumulator, which is then normalized in place and spent (its matrix
    handed over and freed as soon as it is copied).

    Damping adds ``max(0.12 * mean(diag H), 1e-5)`` to the diagonal, once more on every failed
    attempt, up to 10 attempts (reference 5.2). Holds two ``[K, K]`` float32 matrices at once
    besides a given tensor ``h`` (a Llama-2-7B down_proj's is 0.45 GiB), and for a spent
    accumulator two in all: on a GPU the permuted Hessian waits in host memory for a retry."""
    if isinstance(h, Hessian):
        acc, h = h, h.normalized(in_place=True)
        acc.h = None  # the only reference left is ours
    h = h.to(torch.float32)
    diag = torch.diagonal(h)
    # stable sort: equal diagonals (dead input features) keep their order, so runs repeat exactly
    perm = torch.argsort(diag, descending=True, stable=True)
    # indexing copies, one dimension at a time: the caller's h is left alone, and where it was
    # handed over, it is freed before the second copy is made
    hp = h[perm]
    del h, diag
    hp = hp[:, perm]
    damp = max(PERCDAMP * torch.mean(torch.diagonal(hp)).item(), DAMP_MIN)
    if not math.isfinite(damp):
        raise Exl2Error(f"{name}: the calibration statistics hold NaN or Inf; the input states are broken")
    dev = hp.device
    idx = torch.arange(hp.shape[0], device=dev)
    for _ in range(DAMP_RETRIES):
        hp[idx, idx] += damp
        try:
            lower = torch.linalg.cholesky(hp)
        except torch.linalg.LinAlgError:
            continue
        keep = hp  # the damped matrix, for another attempt: in host memory where there is a GPU
        if dev.type == "cuda":
            keep = pinned_copy(hp)  # read back on this stream only: no host sync
        del hp
        hinv = torch.cholesky_inverse(lower)
        del lower  # each [K, K] float32 is 0.45 GiB for a Llama-2-7B down_proj
        u = None
        if torch.isfinite(hinv).all():
            try:
                u = torch.linalg.cholesky(hinv, upper=True)
            except torch.linalg.LinAlgError:
                pass
        del hinv
        if u is not None:  # the factor comes as a transposed view: every pass reads it in rows, so
            u = u.contiguous()  # made contiguous here, once (not a 0.45 GiB copy per 7B down_proj pass)
        if u is not None and torch.isfinite(u).all():
            if large_factor(u.shape[0]):  # the freed [K, K] temporaries: 0.9 GiB for a 7B down_proj
                release_unused(dev)
            return Prepared(perm=perm, u=u)
        hp = keep.to(dev, non_blocking=True)
    raise Exl2Error(f"{name}: the Hessian is not invertible even after {DAMP_RETRIES} rounds of damping; "
                    "the calibration data may be degenerate (try another dataset)")


# -- scales -----------------------------------------------------------------------------------------


def find_params(x: torch.Tensor, bits: int, row_weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group scale search (reference 5.4), then each column's scale index refined
    (:func:`refine_qs`).

    x: float32 ``[rows, N]``, the group's current (error-compensated) rows; row_weight: float32
    ``[rows]``, each row's weight in the refinement (:func:`row_weights`; None: all 1).
    Returns ``(qs int64 [N] in 1..16, qscale_max float16 scalar tensor, scale float32 [N])``."""
    qs, qmax, scale = find_params_many(x.unsqueeze(0), [0], 0, [x.shape[0]], [bits], row_weight)
    return qs[0], qmax[0], scale[0]


def row_weights(u: torch.Tensor) -> torch.Tensor:
    """GPTQ's weight of each (permuted) row's rounding error: ``1 / U[c, c]^2`` for the factor
    ``U`` of :class:`Prepared` (row ``c``'s error enters the objective divided by ``U[c, c]``)."""
    return torch.diagonal(u).square().reciprocal().contiguous()


def refine_qs(x: torch.Tensor, qs: torch.Tensor, qscale_max: torch.Tensor, bits: list[int],
              row_weight: torch.Tensor) -> torch.Tensor:
    """Torch reference of the scale-index refinement: for each column, of ``qs - 1``, ``qs`` and
    ``qs + 1`` (within 1..16) the index whose effective scale (:func:`exl2conv.pack.dequant_scale`) rounds the
    group's rows with the least weighted squared error ``sum_r row_weight[r] (q s - x)^2``, where
    ``q = clamp(rint(x / s))`` as in the p-grid search; ``qs`` itself unless another is strictly
    better. The p-grid search picks one multiplier for the whole group from the columns' maxima;
    this moves single columns by one step of the 4-bit scale grid where that rounds them better
    (on SmolLM2's layers, GPTQ's Hessian-weighted error fell 3-4 % at 6 bits, 9 % at 4, 12 % at 3).

    x: ``[B, R, N]`` (rows past a group's end zero); qs: int64 ``[B, N]``; qscale_max: float16
    ``[B]``; bits: ``[B]``; row_weight: ``[R]``. Returns int64 ``[B, N]``."""
    def make():
        f32 = dict(dtype=torch.float32, device=x.device)
        return (torch.tensor([-qzero(b) for b in bits], **f32).view(-1, 1, 1),
                torch.tensor([maxq(b) - qzero(b) for b in bits], **f32).view(-1, 1, 1))
    lo, hi = device_constant(("code range", tuple(bits)), x.device, make)  # no host copy per group
    rw = row_weight.view(1, -1, 1)
    best_q, best_e = qs, None
    for cand in (qs, torch.clamp(qs - 1, min=1), torch.clamp(qs + 1, max=16)):
        s = dequant_scale(cand, qscale_max).float().unsqueeze(1)  # [B, 1, N]
        d = torch.minimum(torch.maximum(torch.round(x / s), lo), hi) * s - x
        e = (rw * (d * d)).sum(dim=1)
        if best_e is None:
            best_e = e
        else:
            better = e < best_e
            best_q, best_e = torch.where(better, cand, best_q), torch.where(better, e, best_e)
    return best_q


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


def _group_tensors(dev, cidx: list[int], rows: list[int], bits: list[int]) -> dict:
    """Device copies of a batch's index lists (and its row mask), made once per distinct batch."""
    def make():
        span = max(rows)
        i32 = dict(dtype=torch.int32, device=dev)
        t = {"idx": torch.tensor(cidx, device=dev), "idx32": torch.tensor(cidx, **i32),
             "rows32": torch.tensor(rows, **i32), "bits32": torch.tensor(bits, **i32),
             "half_m": torch.tensor([maxq(b) / 2 for b in bits], dtype=torch.float32, device=dev).view(-1, 1),
             "keep": None, "grid": P_GRID.to(device=dev, dtype=torch.float32)}
        if min(rows) < span:  # rows past a group's end are masked out of the max
            t["keep"] = torch.arange(span, device=dev).view(1, -1, 1) < torch.tensor(rows, device=dev).view(-1, 1, 1)
        return t
    return device_constant(("groups", tuple(cidx), tuple(rows), tuple(bits)), dev, make)


def find_params_many(w: torch.Tensor, cidx: list[int], a: int, rows: list[int],
                     bits: list[int], row_weight: torch.Tensor | None = None,
                     scale_out: torch.Tensor | None = None, out_idx: list[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`find_params` for one group of each of several candidates, batched: candidate
    ``cidx[i]``'s group is rows ``a .. a + rows[i] - 1`` of ``w[cidx[i]]`` at ``bits[i]``;
    row_weight: float32 ``[max(rows)]``, the weights of rows ``a ..`` (None: all 1).

    w: float32 ``[C, K, N]``. Returns ``(qs int64 [B, N], qscale_max float16 [B], scale float32
    [B, N])`` for the B groups. Every value equals what a per-group search gives: the batching only
    saves kernel launches (hundreds of groups per linear). scale_out: float32 ``[C', N]``, where
    the caller keeps each candidate's current scales; given, the CUDA path writes group ``i``'s into
    its row ``out_idx[i]`` (``cidx[i]`` by default) itself and returns None for ``scale``, in five
    kernel launches instead of about thirty (the same values: tests/gpu/test_kernels.py)."""
    dev = w.device
    span = max(rows)
    t = _group_tensors(dev, cidx, rows, bits)
    ext = kernels.get() if w.is_cuda else None
    if row_weight is None:
        row_weight = device_constant(("ones", span), dev, lambda: torch.ones(span, dtype=torch.float32, device=dev))
    if ext is not None and scale_out is not None and fused_kernels():
        wc = w.contiguous()
        qs_f, cand, s_max = ext.params_start(wc, t["idx32"], t["rows32"], t["half_m"].view(-1), a)
        err = ext.pgrid_err_many(wc, t["idx32"], t["rows32"], t["bits32"], cand, t["grid"], a).sum(dim=2)
        dest = t["idx32"] if out_idx is None else _group_tensors(dev, out_idx, rows, bits)["idx32"]
        qs_i, qscale_max = ext.params_finish(wc, t["idx32"], t["rows32"], t["bits32"], dest, err, t["grid"], qs_f,
                                             s_max, row_weight[:span].contiguous(), scale_out, a)
        return qs_i, qscale_max, None
    x = w[t["idx"], a:a + span]  # [B, R, N]
    if t["keep"] is not None:
        x = x * t["keep"]
    amax = x.abs().amax(dim=1) + 1e-12  # [B, N]
    base = amax / t["half_m"]
    s_max = base.amax(dim=1, keepdim=True)  # [B, 1]
    qs = torch.clamp(torch.round(16 * torch.sqrt(base / s_max)), 1, 16)
    cand = (qs / 16) ** 2 * s_max  # [B, N]
    grid = t["grid"]
    if ext is not None:
        err = ext.pgrid_err_many(w.contiguous(), t["idx32"], t["rows32"], t["bits32"], cand.contiguous(), grid,
                                 a).sum(dim=2)
    else:
        err = torch.stack([pgrid_errors(w[c, a:a + r], cand[i], grid, qzero(b), maxq(b))
                           for i, (c, r, b) in enumerate(zip(cidx, rows, bits))])
    # stays on the device: a host sync per group would stall the GPU hundreds of times per linear
    best = torch.argmin(err, dim=1)  # [B]
    qscale_max = (s_max[:, 0] * grid[best]).to(torch.float16)
    qs_i = qs.to(torch.int64)
    if ext is not None:
        qs_i = ext.refine_qs_many(w.contiguous(), t["idx32"], t["rows32"], t["bits32"], qs_i.contiguous(),
                                  qscale_max.contiguous(), row_weight[:span].contiguous(), a)
    else:
        qs_i = refine_qs(x, qs_i, qscale_max, bits, row_weight[:span])
    return qs_i, qscale_max, dequant_scale(qs_i, qscale_max).float()


def pgrid_errors(x: torch.Tensor, cand: torch.Tensor, grid: torch.Tensor, z: int, m: int) -> torch.Tensor:
    """Torch reference of the p-grid search: ``E_j = sum |clamp(rint(x / s_j)) * s_j - x| ** 3.5``
    with ``s_j = cand * p_j``. x: ``[rows, N]``; cand: ``[N]``; grid: ``[P]``. Returns ``[P]``.

    The per-element arithmetic is the kernel's (``((d * d) * d) * sqrt(d)``). A few p values at a
    time through two reused buffers of about 2 MiB: the search is memory-bound, and temporaries
    that stay in cache make it an order of magnitude faster on a CPU than whole-grid temporaries."""
    n_p = grid.numel()
    err = torch.empty(n_p, dtype=torch.float32, device=x.device)
    s_all = cand.view(1, -1) * grid.view(-1, 1)  # [P, N], the kernel's fmul(cand[n], p[j])
    p_chunk = max(1, min(n_p, (1 << 19) // x.numel()))
    xb = x.unsqueeze(0)
    buf = torch.empty((p_chunk,) + tuple(x.shape), dtype=torch.float32, device=x.device)
    cube = torch.empty_like(buf)
    for j0 in range(0, n_p, p_chunk):
        j1 = min(n_p, j0 + p_chunk)
        s = s_all[j0:j1].unsqueeze(1)  # [p, 1, N]
        d, d3 = buf[: j1 - j0], cube[: j1 - j0]
        torch.div(xb, s, out=d)
        d.round_().clamp_(-z, m - z).mul_(s).sub_(xb).abs_()
        torch.mul(d, d, out=d3)
        d3.mul_(d)
        d3.mul_(d.sqrt_())
        err[j0:j1] = d3.sum(dim=(1, 2))
    return err


# -- GPTQ -------------------------------------------------------------------------------------------


@dataclass
class QuantResult:
    """One quantized linear. Rows are in permuted order except ``weight``.

    codes: int16 ``[K, N]`` (0 .. 2^b - 1); qs: int64 ``[G, N]`` (1..16); qscale_max: float16 ``[G]``;
    groups: the layout; q: float32 ``[K, N]`` dequantized ``Wt`` in permuted row order (a view of
    the pass's working tensor)."""

    qparams: QParams
    groups: list[Group]
    codes: torch.Tensor | None
    qs: torch.Tensor
    qscale_max: torch.Tensor
    perm: torch.Tensor
    q: torch.Tensor

    @property
    def invperm(self) -> torch.Tensor:
        return torch.argsort(self.perm)

    @property
    def weight(self) -> torch.Tensor:
        """float32 ``[K, N]``: the dequantized ``Wt`` in original row order (a new tensor)."""
        return self.q[self.invperm]


@dataclass
class Coded:
    """A quantized weight kept as its codes, a quarter of its float32 size: ``decode`` gives
    the dequantized weight bit for bit (the runtime's float16 arithmetic).

    codes: uint8 ``[K, N]`` (permuted rows); zero: int16 ``[K]``, each row's 2^(bits-1);
    scale: float16 ``[G, N]``, each group's effective scale; group: int64 ``[K]``, each row's group;
    invperm: int64 ``[K]``; out_features: the unpadded N."""

    codes: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor
    group: torch.Tensor
    invperm: torch.Tensor
    out_features: int

    @classmethod
    def of(cls, res: QuantResult, out_features: int, invperm: torch.Tensor) -> "Coded":
        """From a result with or without codes (the codes are recovered from the dequantized
        values): each is ``fp16(c * s)`` for an integer ``|c| <= 128`` and the row's float16 scale
        ``s``, so ``q / s`` lies within ``128 * 2^-11`` of ``c`` and rounds back to it exactly (a
        zero scale, whose values are all zero, keeps the zero point)."""
        dev = res.q.device

        def make():
            rows = torch.tensor([g.rows for g in res.groups])
            zero = torch.tensor([qzero(g.bits) for g in res.groups], dtype=torch.int16)
            return (torch.repeat_interleave(torch.arange(len(res.groups)), rows).to(dev),
                    torch.repeat_interleave(zero, rows).to(dev))
        group, zero = device_constant(("coded", tuple((g.rows, g.bits) for g in res.groups)), dev, make)
        scale = dequant_scale(res.qs, res.qscale_max)
        k, n = res.q.shape
        codes = torch.empty((k, n), dtype=torch.uint8, device=dev)
        ext = kernels.get() if res.q.is_cuda else None
        if ext is not None and fused_kernels() and res.q.is_contiguous():  # one kernel, the arithmetic below
            ext.codes_of(res.q, scale, group, zero, codes)
            return cls(codes=codes, zero=zero, scale=scale, group=group, invperm=invperm, out_features=out_features)
        step = max(1, (32 << 20) // (4 * n))  # rows at a time: a few float32 temporaries of 32 MiB
        for r0 in range(0, k, step):
            s = scale[group[r0:r0 + step]].to(torch.float32)
            c = torch.where(s > 0, torch.round(res.q[r0:r0 + step] / s), 0).add_(zero[r0:r0 + step].view(-1, 1))
            codes[r0:r0 + step] = c
        return cls(codes=codes, zero=zero, scale=scale, group=group, invperm=invperm, out_features=out_features)

    def to_host(self, arena: HostArena | None = None) -> "Coded":
        """The same weight with its codes moved to pinned host memory (where there is a GPU;
        into ``arena`` when given): the small tensors stay, and :meth:`decode` copies the codes
        back in."""
        if self.codes.device.type == "cpu":
            return self
        codes = arena.copy_of(self.codes) if arena is not None else pinned_copy(self.codes, non_blocking=False)
        return Coded(codes=codes, zero=self.zero, scale=self.scale, group=self.group, invperm=self.invperm,
                     out_features=self.out_features)

    def delta(self, base: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor | None:
        """``bfloat16(decode() - base)`` in one kernel (csrc/quantize.cu ``coded_delta``), with the
        strides of that expression's result (``[out, K]``, column-major): what the measurement's
        corrected forwards take for each candidate, once per chunk of rows. base: ``[out, K]``,
        contiguous, float32, float16 or bfloat16, on the device of the scales; codes: as for
        :meth:`decode`. None where the kernel cannot run (no CUDA extension)."""
        ext = kernels.get() if self.scale.is_cuda else None
        if (ext is None or not fused_kernels() or not base.is_contiguous()
                or base.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
            return None
        if codes is None:
            codes = self.codes.to(self.scale.device, non_blocking=True)
        return ext.coded_delta(codes, self.zero, self.scale, self.group, self.invperm, base)

    def decode(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """float16 ``[out_features, K]``: the weight in the HF orientation and original row order,
        on the device of the scales. codes: this weight's codes already there (see
        :meth:`to_host`); by default copied from wherever they are."""
        if codes is None:
            codes = self.codes.to(self.scale.device, non_blocking=True)
        q = dequant(codes, self.zero.view(-1, 1), self.scale[self.group])
        return q[self.invperm][:, : self.out_features].T


# The CUDA kernels that fuse a torch path's many small operations into one pass (the scale search
# around the p-grid, Coded.of, Coded.delta): the same values as the paths they replace, bit for bit
# (tests/gpu/test_kernels.py compares the two on a GPU). On by default; EXL2CONV_FUSED_KERNELS=0
# takes the torch paths (a fallback should a kernel misbehave on some GPU).
def fused_kernels() -> bool:
    return settings.active().fused_kernels


# The measurement's working set for one pass of candidates (quantize_batches): 1 GiB holds five
# candidates of a Llama-2-7B MLP linear; 2 GiB was 10-30 % faster per linear but one of the largest
# items of the measurement's peak memory.
GPTQ_BYTES = 1 << 30


def batch_size(k: int, n: int, count: int, keep_codes: bool, max_bytes: int | None) -> int:
    """Candidates per pass so that a pass's working tensors (float32 weights, int16 codes) stay
    within ``max_bytes`` (at least one); all ``count`` for None. Balanced: 5 + 5 + 4, not 6 + 6 + 2."""
    if max_bytes is None or count <= 1:
        return max(count, 1)
    per = k * n * (4 + (2 if keep_codes else 0))
    size = max(1, min(count, max_bytes // per))
    passes = -(-count // size)
    return -(-count // passes)


def quantize_many(wt: torch.Tensor, prep: Prepared, candidates: list[QParams],
                  keep_codes: bool = True, max_bytes: int | None = None) -> list[QuantResult]:
    """GPTQ of one weight for several candidate settings, in as few passes over the rows as
    ``max_bytes`` allows (None: one pass; :func:`quantize_batches`). Returns one :class:`QuantResult` per
    candidate, in order: all passes' working tensors are held, so take the batches one at a time
    (:func:`quantize_batches`) where that matters."""
    return [r for batch in quantize_batches(wt, prep, candidates, keep_codes, max_bytes) for r in batch]


@dataclass
class Filler:
    """A weight that GPTQ's passes fill in themselves: ``fill(out)`` writes the float32 ``[K, N]``
    weight, rows in ``prep.perm`` order, into ``out``. No whole float32 copy waits beside the
    passes (a Llama-2-7B MLP linear's is 0.18 GiB)."""

    shape: tuple[int, int]
    device: torch.device
    fill: Callable[[torch.Tensor], None]
    # float32 storage that every pass works in, when large enough: a pass's results are then
    # valid only until the next pass is asked for (the measurement takes each pass's codes at once)
    buffer: torch.Tensor | None = None


def quantize_batches(wt: "torch.Tensor | Filler", prep: Prepared, candidates: list[QParams],
                     keep_codes: bool = True, max_bytes: int | None = None, permuted: bool = False):
    """Yields the :class:`QuantResult` of ``candidates`` (in order) one pass at a time, each pass
    quantizing as many of them together as fit ``max_bytes`` (:func:`batch_size`). Every
    candidate's arithmetic is independent of the others in its pass: the same bits for any
    batching. A pass's tensors are freed once the caller drops its results. ``permuted``: ``wt``
    is float32 with its rows already in ``prep.perm`` order, and handed over (the last pass may
    overwrite it); else it is left alone. A :class:`Filler` fills each candidate's rows itself."""
    k, n = wt.shape
    if k % BLOCK or n % 32:
        raise ValueError(f"GPTQ needs K and N multiples of 32, got K={k}, N={n}")
    perm = prep.perm.to(wt.device)
    size = batch_size(k, n, len(candidates), keep_codes, max_bytes)
    if isinstance(wt, Filler):
        for c0 in range(0, len(candidates), size):
            part = candidates[c0:c0 + size]
            if wt.buffer is not None and wt.buffer.numel() >= len(part) * k * n:
                w = wt.buffer[:len(part) * k * n].view(len(part), k, n)
            else:
                w = torch.empty((len(part), k, n), dtype=torch.float32, device=wt.device)
            for c in range(len(part)):
                wt.fill(w[c])
            yield _gptq_pass(w, prep, perm, part, keep_codes)
            del w
        return
    base = wt if permuted else wt.to(torch.float32)[perm]  # indexing copies: wt is left alone
    del wt
    for c0 in range(0, len(candidates), size):
        part = candidates[c0:c0 + size]
        last = c0 + size >= len(candidates)
        w = base.unsqueeze(0) if (last and len(part) == 1) else base.unsqueeze(0).repeat(len(part), 1, 1)
        if last:
            del base  # the last pass may work in it directly
        yield _gptq_pass(w, prep, perm, part, keep_codes)
        del w


def _gptq_pass(w: torch.Tensor, prep: Prepared, perm: torch.Tensor, candidates: list[QParams],
               keep_codes: bool) -> list[QuantResult]:
    """One pass over the rows for the candidates of ``w`` (``[C, K, N]`` float32, permuted rows,
    overwritten: each row is replaced by its dequantized values once quantized)."""
    c_count, k, n = w.shape
    dev = w.device
    u = prep.u.to(dev)
    rw = row_weights(u)  # the scale refinement's row weights (find_params_many)
    q_out = w  # a row is read into the block before it is overwritten, and never read after
    codes_out = torch.empty((c_count, k, n), dtype=torch.int16, device=dev) if keep_codes else None

    layouts = [q.groups(k) for q in candidates]
    starts = [{} for _ in layouts]  # per candidate: first row of each group -> group index
    for ci, groups in enumerate(layouts):
        pos = 0
        for gi, g in enumerate(groups):
            starts[ci][pos] = gi
            pos += g.rows

    def make_rows():
        row_bits = torch.empty((c_count, k), dtype=torch.int64)
        for ci, groups in enumerate(layouts):
            pos = 0
            for g in groups:
                row_bits[ci, pos:pos + g.rows] = g.bits
                pos += g.rows
        row_bits = row_bits.to(dev)
        zero_rows = 1 << (row_bits - 1)  # [C, K]
        max_rows = (1 << row_bits) - 1
        return zero_rows, max_rows, zero_rows.to(torch.int32).contiguous(), max_rows.to(torch.int32).contiguous()
    key = ("rows", k, tuple(tuple((g.rows, g.bits) for g in groups) for groups in layouts))
    zero_rows, max_rows, zero32, max32 = device_constant(key, dev, make_rows)

    qs_out = [[None] * len(g) for g in layouts]
    qmax_out = [[None] * len(g) for g in layouts]
    scale = torch.empty((c_count, n), dtype=torch.float32, device=dev)
    # the scaled errors of the current span's blocks, block by block (each block's [C, 32, N]
    # contiguous for the kernel)
    err_span = torch.empty((SPAN // BLOCK, c_count, BLOCK, n), dtype=torch.float32, device=dev)
    floor = torch.zeros((c_count, 1), dtype=torch.int64, device=dev)
    ext = kernels.get() if w.is_cuda else None
    if ext is not None:
        u = u.contiguous()  # a no-op for a factor from prepare
        no_codes = torch.empty(0, dtype=torch.int16, device=dev)

    # Spans of SPAN rows: each block's errors update the later rows of its span at once, and the
    # rows past the span all together when it closes, one product of depth SPAN instead of four of
    # depth 32 (the update is memory-bound: it reads and writes every later row each time). The
    # spans are the same for every candidate, so a candidate's bits do not depend on the others.
    s0 = 0
    for a in range(0, k, BLOCK):
        b = a + BLOCK
        if a % SPAN == 0:
            stop.check()  # a 7B MLP linear's pass runs for seconds on a GPU, minutes on a CPU
        if a % SPAN == 0 and a > 0:
            _update_past(w, u, err_span, s0, a)
            s0 = a
        s1 = min(k, s0 + SPAN)
        opening = [(ci, starts[ci][a]) for ci in range(c_count) if a in starts[ci]]
        if opening:  # the candidates whose next group starts at this block
            groups = [layouts[ci][gi] for ci, gi in opening]
            cis = [ci for ci, _ in opening]
            rows_, bits_ = [g.rows for g in groups], [g.bits for g in groups]
            idx = _group_tensors(dev, cis, rows_, bits_)["idx"]
            if a + max(rows_) <= s1:
                qs, qmax, sc = find_params_many(w, cis, a, rows_, bits_, rw[a:], scale_out=scale)
            else:
                x = _group_rows(w, u, err_span, idx, cis, a, rows_, s0, s1)
                qs, qmax, sc = find_params_many(x, list(range(len(cis))), 0, rows_, bits_, rw[a:], scale_out=scale,
                                                out_idx=cis)
            for i, (ci, gi) in enumerate(opening):
                qs_out[ci][gi], qmax_out[ci][gi] = qs[i], qmax[i]
            if sc is not None:  # else written into scale already
                scale.index_copy_(0, idx, sc)
        err_blk = err_span[(a - s0) // BLOCK]
        if ext is not None:
            ext.gptq_block(w, scale, zero32, max32, u, q_out, codes_out if codes_out is not None else no_codes,
                           err_blk, a)
        else:
            gptq_block_rows(w, scale, zero_rows, max_rows, floor, u, q_out, codes_out, err_blk, a)
        if b < s1:  # the span's later rows: W[b:s1] -= U[a:b, b:s1]^T Err[a:b], in place
            w[:, b:s1, :].baddbmm_(u[a:b, b:s1].T.unsqueeze(0).expand(c_count, -1, -1), err_blk, alpha=-1)

    return [QuantResult(qparams=q, groups=layouts[ci], codes=codes_out[ci] if codes_out is not None else None,
                        qs=torch.stack(qs_out[ci]), qscale_max=torch.stack(qmax_out[ci]), perm=perm, q=q_out[ci])
            for ci, q in enumerate(candidates)]


def _span_errors(err_span: torch.Tensor, blocks: int, ci: int | None = None) -> torch.Tensor:
    """The scaled errors of a span's first ``blocks`` blocks: ``[C, 32 * blocks, N]``, or
    ``[32 * blocks, N]`` of candidate ``ci``."""
    e = err_span[:blocks] if ci is None else err_span[:blocks, ci].unsqueeze(1)
    e = e.transpose(0, 1).reshape(e.shape[1], blocks * BLOCK, e.shape[3])
    return e if ci is None else e[0]


def _update_past(w: torch.Tensor, u: torch.Tensor, err_span: torch.Tensor, s0: int, a: int) -> None:
    """The rows past a span ``s0 .. a``: ``W[a:] -= U[s0:a, a:]^T Err[s0:a]``, in place."""
    c_count = w.shape[0]
    err = _span_errors(err_span, (a - s0) // BLOCK)
    w[:, a:, :].baddbmm_(u[s0:a, a:].T.unsqueeze(0).expand(c_count, -1, -1), err, alpha=-1)


def _group_rows(w: torch.Tensor, u: torch.Tensor, err_span: torch.Tensor, idx: torch.Tensor, cis: list[int],
                a: int, rows: list[int], s0: int, s1: int) -> torch.Tensor:
    """The rows of groups opening at row ``a`` (candidate ``cis[i]``'s rows ``a .. a + rows[i]``) as
    ``[B, max(rows), N]``, for the scale search of groups that reach past the span ``s0 .. s1``:
    their rows past it are given the update of the span's blocks so far (out of place: the rows
    themselves get it when the span closes). idx: ``cis`` on the device."""
    x = w[idx, a:a + max(rows)]  # indexing copies
    for i, (ci, r) in enumerate(zip(cis, rows)):
        end = a + r
        if end > s1 and a > s0:
            err = _span_errors(err_span, (a - s0) // BLOCK, ci)
            x[i, s1 - a:r].sub_(u[s0:a, s1:end].T @ err)
    return x


def gptq_block_rows(w, scale, zero_rows, max_rows, floor, u, q_out, codes_out, err_blk, a: int) -> None:
    """Torch reference of one 32-row GPTQ block for C candidates (csrc/quantize.cu
    ``gptq_block_kernel``): quantize each row, dequantize with the runtime's fp16 arithmetic, and
    push the scaled error onto the block's later rows. w, q_out: ``[C, K, N]``; scale: ``[C, N]``;
    zero_rows, max_rows: ``[C, K]``; err_blk: ``[C, 32, N]`` (written)."""
    b = a + BLOCK
    for c in range(a, b):
        z = zero_rows[:, c:c + 1]
        row = w[:, c, :]
        q = torch.clamp(torch.round(row / scale) + z, floor, max_rows[:, c:c + 1])
        qv = dequant(q, z, scale).float()
        err = (row - qv) / u[c, c]
        q_out[:, c, :] = qv
        err_blk[:, c - a, :] = err
        if codes_out is not None:
            codes_out[:, c, :] = q.to(torch.int16)
        if c + 1 < b:
            w[:, c + 1:b, :] -= u[c, c + 1:b].view(1, -1, 1) * err.unsqueeze(1)


def quantize(wt: torch.Tensor, prep: Prepared, qparams: QParams) -> QuantResult:
    """GPTQ of one weight ``[K, N]`` with one setting; see :func:`quantize_many`."""
    return quantize_many(wt, prep, [qparams])[0]


def proxy_error(wt: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)`` with ``W = wt^T``: the output error GPTQ minimises.
    wt, q: ``[K, N]``; h: ``[K, K]``."""
    d = (wt.to(torch.float64) - q.to(torch.float64))
    return float(torch.einsum("kn,kl,ln->", d, h.to(torch.float64), d))
