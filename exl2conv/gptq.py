"""GPTQ as ExLlamaV2's AdaptiveGPTQ computes it, as pure torch functions (CPU or CUDA).

Shapes follow ExLlamaV2's convention: a linear's HF weight ``W`` is ``[out, in]``; GPTQ works on
``Wt = W^T`` of shape ``[K, N]`` with K = in_features and N = out_features padded to a multiple of 32.
"Permuted" means rows of ``Wt`` reordered by the act-order permutation ``perm``.

Several candidate QParams of one linear are quantized together (:func:`quantize_many`): they share
the weight, the Hessian inverse and the row order, so one pass over the rows serves them all. The
arithmetic per row is ExLlamaV2's (conversion/adaptivegptq.py, AdaptiveQuantizer.find_params and
AdaptiveGPTQ.quantize); only the order in which the lazy block updates are summed differs (spans of
128 rows, see :func:`_gptq_pass`, instead of each group), which changes float32 rounding, not the
maths. The CUDA kernels and their torch references are in :mod:`exl2conv.ops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from exl2conv import ops, stop
from exl2conv.errors import Exl2Error
from exl2conv.memory import device_constant, large_factor, pinned_copy, release_unused
from exl2conv.qparams import Group, QParams

PERCDAMP = 0.12
DAMP_MIN = 1e-5
DAMP_RETRIES = 10
P_GRID = torch.linspace(0.70, 1.20, 97, dtype=torch.float64)  # exact 0.70 + 0.50 * j / 96
ERR_NORM = 3.5
BLOCK = 32  # every group boundary is a multiple of 32 rows
SPAN = 128  # rows whose errors update the later rows in one product (see _gptq_pass)


# -- Hessian ----------------------------------------------------------------------------------------


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


def prepare(h: "torch.Tensor | Hessian", name: str = "") -> Prepared:
    """Act-order permutation and damped inverse Cholesky factor of a normalized Hessian ``[K, K]``,
    or of a :class:`Hessian` accumulator, which is then normalized in place and spent (its matrix
    handed over and freed as soon as it is copied).

    Damping adds ``max(0.12 * mean(diag H), 1e-5)`` to the diagonal, once more on every failed
    attempt, up to 10 attempts (ExLlamaV2's conversion/adaptivegptq.py, AdaptiveGPTQ.prepare).
    Holds two ``[K, K]`` float32 matrices at once besides a given tensor ``h`` (a Llama-2-7B
    down_proj's is 0.45 GiB), and for a spent accumulator two in all: on a GPU the permuted Hessian
    waits in host memory for a retry."""
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
    """Per-group scale search (ExLlamaV2's conversion/adaptivegptq.py, AdaptiveQuantizer.find_params),
    then each column's scale index refined (:func:`exl2conv.ops.refine_qs`).

    x: float32 ``[rows, N]``, the group's current (error-compensated) rows; row_weight: float32
    ``[rows]``, each row's weight in the refinement (:func:`row_weights`; None: all 1).
    Returns ``(qs int64 [N] in 1..16, qscale_max float16 scalar tensor, scale float32 [N])``."""
    qs, qmax, scale = find_params_many(x.unsqueeze(0), [0], 0, [x.shape[0]], [bits], row_weight)
    return qs[0], qmax[0], scale[0]


def row_weights(u: torch.Tensor) -> torch.Tensor:
    """GPTQ's weight of each (permuted) row's rounding error: ``1 / U[c, c]^2`` for the factor
    ``U`` of :class:`Prepared` (row ``c``'s error enters the objective divided by ``U[c, c]``)."""
    return torch.diagonal(u).square().reciprocal().contiguous()


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
    the caller keeps each candidate's current scales; given, group ``i``'s are written into its row
    ``out_idx[i]`` (``cidx[i]`` by default) and None is returned for ``scale``. On a GPU the search
    is five kernel launches (:mod:`exl2conv.ops`: params_start, pgrid_err_many, params_finish)
    instead of about thirty (the same values: tests/gpu/test_kernels.py)."""
    dev = w.device
    span = max(rows)
    t = ops.group_batch(dev, cidx, rows, bits, P_GRID)
    if row_weight is None:
        row_weight = device_constant(("ones", span), dev, lambda: torch.ones(span, dtype=torch.float32, device=dev))
    qs, cand, s_max = ops.params_start(w, t, a)
    err = ops.pgrid_err_many(w, t, cand, a)
    own = scale_out is None
    if own:
        scale_out = torch.empty((len(cidx), w.shape[2]), dtype=torch.float32, device=dev)
        dest = ops.group_batch(dev, list(range(len(cidx))), rows, bits, P_GRID)
    else:
        dest = t if out_idx is None else ops.group_batch(dev, out_idx, rows, bits, P_GRID)
    qs_i, qscale_max = ops.params_finish(w, t, dest, err, qs, s_max, row_weight, scale_out, a)
    return qs_i, qscale_max, scale_out if own else None


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
        return zero_rows.to(torch.int32).contiguous(), max_rows.to(torch.int32).contiguous()
    key = ("rows", k, tuple(tuple((g.rows, g.bits) for g in groups) for groups in layouts))
    zero_rows, max_rows = device_constant(key, dev, make_rows)

    qs_out = [[None] * len(g) for g in layouts]
    qmax_out = [[None] * len(g) for g in layouts]
    scale = torch.empty((c_count, n), dtype=torch.float32, device=dev)
    # the scaled errors of the current span's blocks, block by block (each block's [C, 32, N]
    # contiguous for the kernel)
    err_span = torch.empty((SPAN // BLOCK, c_count, BLOCK, n), dtype=torch.float32, device=dev)

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
            if a + max(rows_) <= s1:
                qs, qmax, _ = find_params_many(w, cis, a, rows_, bits_, rw[a:], scale_out=scale)
            else:
                idx = ops.group_batch(dev, cis, rows_, bits_, P_GRID).idx
                x = _group_rows(w, u, err_span, idx, cis, a, rows_, s0, s1)
                qs, qmax, _ = find_params_many(x, list(range(len(cis))), 0, rows_, bits_, rw[a:], scale_out=scale,
                                               out_idx=cis)
            for i, (ci, gi) in enumerate(opening):
                qs_out[ci][gi], qmax_out[ci][gi] = qs[i], qmax[i]
        err_blk = err_span[(a - s0) // BLOCK]
        ops.gptq_block(w, scale, zero_rows, max_rows, u, q_out, codes_out, err_blk, a)
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


def quantize(wt: torch.Tensor, prep: Prepared, qparams: QParams) -> QuantResult:
    """GPTQ of one weight ``[K, N]`` with one setting; see :func:`quantize_many`."""
    return quantize_many(wt, prep, [qparams])[0]


def proxy_error(wt: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)`` with ``W = wt^T``: the output error GPTQ minimises.
    wt, q: ``[K, N]``; h: ``[K, K]``."""
    d = (wt.to(torch.float64) - q.to(torch.float64))
    return float(torch.einsum("kn,kl,ln->", d, h.to(torch.float64), d))
