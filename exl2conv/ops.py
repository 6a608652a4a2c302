"""The CUDA kernels' operations, each beside its torch reference, and the one place that picks one.

Every kernel of csrc/ (:data:`exl2conv.kernels.OPS`) has here a function of the same name that
GPTQ, the measurement and the runtime's EXL2 linear call, and a named torch reference (``<name>_ref``) that defines the
arithmetic the kernel reproduces; :data:`REGISTRY` maps each name to both. The kernel runs where
the extension is loaded (:func:`exl2conv.kernels.get`), the tensors are on a GPU and, for the
kernels that fuse a torch path's many small operations (:attr:`Op.fused`), the
``fused_kernels`` setting is on (``EXL2CONV_FUSED_KERNELS=0`` turns them off, should one misbehave
on some GPU); everywhere else the reference runs. tests/gpu/test_kernels.py checks every kernel of
the registry against its reference on a GPU.

A batch of groups (:class:`GroupBatch`) is one group of each of B candidates of a GPTQ pass's
weights ``w`` (float32 ``[C, K, N]``, rows in act order): candidate ``cidx[i]``'s rows
``a .. a + rows[i] - 1`` at ``bits[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from exl2conv import kernels, settings
from exl2conv.memory import device_constant
from exl2conv.pack import QUANT_KEYS, decode_linear, dequant, dequant_scale, maxq, qzero

BLOCK = 32  # rows of one gptq_block


@dataclass(frozen=True)
class Op:
    """One kernel: the function that picks the path, the torch reference, and whether it is one of
    the fused kernels (which the ``fused_kernels`` setting turns off)."""

    dispatch: Callable
    reference: Callable
    fused: bool


def kernel(name: str, t: torch.Tensor) -> Callable | None:
    """The extension's kernel ``name`` where it runs for tensors on the device of ``t``, else None."""
    if not t.is_cuda:
        return None
    ext = kernels.get()
    if ext is None or (REGISTRY[name].fused and not settings.active().fused_kernels):
        return None
    return getattr(ext, name)


@dataclass(frozen=True)
class GroupBatch:
    """A batch's lists and their device copies (made once per distinct batch, see :func:`group_batch`)."""

    cidx: tuple[int, ...]
    rows: tuple[int, ...]
    bits: tuple[int, ...]
    idx: torch.Tensor      # int64 [B]: cidx
    idx32: torch.Tensor    # int32 [B]: cidx, rows and bits as the kernels take them
    rows32: torch.Tensor
    bits32: torch.Tensor
    half_m: torch.Tensor   # float32 [B, 1]: (2^bits - 1) / 2
    keep: torch.Tensor | None  # bool [B, max(rows), 1]: rows within each group; None where all are
    grid: torch.Tensor     # float32 [P]: the p-grid of the scale search

    @property
    def span(self) -> int:
        return max(self.rows)


def group_batch(dev: torch.device, cidx: list[int], rows: list[int], bits: list[int],
                grid: torch.Tensor) -> GroupBatch:
    """The :class:`GroupBatch` of these lists on ``dev`` (a host copy per batch would sync the host
    with the GPU hundreds of times per linear); grid: the p-grid, any float dtype, the same for the
    whole run (batches are cached by their lists alone)."""
    def make():
        i32 = dict(dtype=torch.int32, device=dev)
        keep = None
        if min(rows) < max(rows):  # rows past a group's end are masked out of the max
            keep = torch.arange(max(rows), device=dev).view(1, -1, 1) < torch.tensor(rows, device=dev).view(-1, 1, 1)
        return GroupBatch(
            cidx=tuple(cidx), rows=tuple(rows), bits=tuple(bits), idx=torch.tensor(cidx, device=dev),
            idx32=torch.tensor(cidx, **i32), rows32=torch.tensor(rows, **i32), bits32=torch.tensor(bits, **i32),
            half_m=torch.tensor([maxq(b) / 2 for b in bits], dtype=torch.float32, device=dev).view(-1, 1),
            keep=keep, grid=grid.to(device=dev, dtype=torch.float32))
    return device_constant(("groups", tuple(cidx), tuple(rows), tuple(bits)), dev, make)


def group_rows(w: torch.Tensor, t: GroupBatch, a: int) -> torch.Tensor:
    """The batch's rows as ``[B, max(rows), N]`` (a copy), rows past a group's end zero."""
    x = w[t.idx, a:a + t.span]
    return x if t.keep is None else x * t.keep


# -- gptq_block -------------------------------------------------------------------------------------


def gptq_block(w, scale, zero_rows, max_rows, u, q_out, codes_out, err_blk, a: int) -> None:
    """One 32-row GPTQ block for C candidates, rows ``a .. a + 31``: see :func:`gptq_block_ref`."""
    fn = kernel("gptq_block", w)
    if fn is None:
        return gptq_block_ref(w, scale, zero_rows, max_rows, u, q_out, codes_out, err_blk, a)
    if codes_out is None:
        codes_out = torch.empty(0, dtype=torch.int16, device=w.device)
    fn(w, scale, zero_rows, max_rows, u.contiguous(), q_out, codes_out, err_blk, a)


def gptq_block_ref(w, scale, zero_rows, max_rows, u, q_out, codes_out, err_blk, a: int) -> None:
    """Torch reference of ``gptq_block`` (csrc/quantize.cu ``gptq_block_kernel``; ExLlamaV2's
    conversion/adaptivegptq.py, AdaptiveGPTQ.quantize): quantize each row, dequantize with the
    runtime's fp16 arithmetic (:func:`exl2conv.pack.dequant`), and push the scaled error onto the
    block's later rows. w, q_out: float32 ``[C, K, N]``; scale: float32 ``[C, N]``; zero_rows,
    max_rows: int32 ``[C, K]``, each row's zero point and largest code; u: the factor of
    :class:`exl2conv.gptq.Prepared`; codes_out: int16 ``[C, K, N]`` or None; err_blk: float32
    ``[C, 32, N]`` (written)."""
    b = a + BLOCK
    floor = torch.zeros_like(zero_rows[:, :1])
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


# -- the scale search: params_start, pgrid_err_many, params_finish (with refine_qs_many) ------------


def params_start(w: torch.Tensor, t: GroupBatch, a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scale search before the p-grid: see :func:`params_start_ref`."""
    fn = kernel("params_start", w)
    if fn is None:
        return params_start_ref(w, t, a)
    qs, cand, s_max = fn(w.contiguous(), t.idx32, t.rows32, t.half_m.view(-1), a)
    return qs, cand, s_max


def params_start_ref(w: torch.Tensor, t: GroupBatch, a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of ``params_start`` (ExLlamaV2's conversion/adaptivegptq.py,
    AdaptiveQuantizer.find_params): each column's base scale from its absolute maximum, the group's
    largest ``s_max``, each column's 4-bit scale index ``qs`` in 1..16 relative to it, and the
    candidate scales ``cand = (qs / 16)^2 s_max`` that the p-grid multiplies. Returns ``(qs float32
    [B, N], cand float32 [B, N], s_max float32 [B])``."""
    x = group_rows(w, t, a)
    amax = x.abs().amax(dim=1) + 1e-12  # [B, N]
    base = amax / t.half_m
    s_max = base.amax(dim=1, keepdim=True)  # [B, 1]
    qs = torch.clamp(torch.round(16 * torch.sqrt(base / s_max)), 1, 16)
    cand = (qs / 16) ** 2 * s_max
    return qs, cand, s_max[:, 0]


def pgrid_err_many(w: torch.Tensor, t: GroupBatch, cand: torch.Tensor, a: int) -> torch.Tensor:
    """The p-grid errors of each group, float32 ``[B, P]``: see :func:`pgrid_err_many_ref`."""
    fn = kernel("pgrid_err_many", w)
    if fn is None:
        return pgrid_err_many_ref(w, t, cand, a)
    return fn(w.contiguous(), t.idx32, t.rows32, t.bits32, cand.contiguous(), t.grid, a).sum(dim=2)


def pgrid_err_many_ref(w: torch.Tensor, t: GroupBatch, cand: torch.Tensor, a: int) -> torch.Tensor:
    """Torch reference of ``pgrid_err_many`` (whose partial sums per block of columns are added
    here): :func:`pgrid_errors` of each group. The kernel adds in another order, so the sums agree
    to float32 rounding, not bit for bit."""
    return torch.stack([pgrid_errors(w[c, a:a + r], cand[i], t.grid, qzero(b), maxq(b))
                        for i, (c, r, b) in enumerate(zip(t.cidx, t.rows, t.bits))])


def pgrid_errors(x: torch.Tensor, cand: torch.Tensor, grid: torch.Tensor, z: int, m: int) -> torch.Tensor:
    """The p-grid search's error of one group (ExLlamaV2's conversion/adaptivegptq.py,
    AdaptiveQuantizer.find_params): ``E_j = sum |clamp(rint(x / s_j)) * s_j - x| ** 3.5`` with
    ``s_j = cand * p_j``. x: ``[rows, N]``; cand: ``[N]``; grid: ``[P]``. Returns ``[P]``.

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


def params_finish(w: torch.Tensor, t: GroupBatch, dest: GroupBatch, err: torch.Tensor, qs: torch.Tensor,
                  s_max: torch.Tensor, row_weight: torch.Tensor, scale_out: torch.Tensor, a: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale search after the p-grid: see :func:`params_finish_ref`."""
    fn = kernel("params_finish", w)
    if fn is None:
        return params_finish_ref(w, t, dest, err, qs, s_max, row_weight, scale_out, a)
    qs_i, qscale_max = fn(w.contiguous(), t.idx32, t.rows32, t.bits32, dest.idx32, err, t.grid, qs, s_max,
                          row_weight[:t.span].contiguous(), scale_out, a)
    return qs_i, qscale_max


def params_finish_ref(w: torch.Tensor, t: GroupBatch, dest: GroupBatch, err: torch.Tensor, qs: torch.Tensor,
                      s_max: torch.Tensor, row_weight: torch.Tensor, scale_out: torch.Tensor, a: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``params_finish``: each group's best p (the first of the least error,
    ``err`` float32 ``[B, P]``), its float16 ``qscale_max``, each column's index refined
    (:func:`refine_qs_many`, the kernel where it runs, as the fused kernel does it), and the
    effective float32 scales (:func:`exl2conv.pack.dequant_scale`) written into rows ``dest.cidx``
    of ``scale_out``. row_weight: float32, the weights of rows ``a ..``. Returns ``(qs int64
    [B, N], qscale_max float16 [B])``."""
    # stays on the device: a host sync per group would stall the GPU hundreds of times per linear
    best = torch.argmin(err, dim=1)  # [B]
    qscale_max = (s_max * t.grid[best]).to(torch.float16)
    qs_i = refine_qs_many(w, t, qs.to(torch.int64), qscale_max, row_weight, a)
    scale_out.index_copy_(0, dest.idx, dequant_scale(qs_i, qscale_max).float())
    return qs_i, qscale_max


def refine_qs_many(w: torch.Tensor, t: GroupBatch, qs: torch.Tensor, qscale_max: torch.Tensor,
                   row_weight: torch.Tensor, a: int) -> torch.Tensor:
    """Each column's scale index refined, int64 ``[B, N]``: see :func:`refine_qs`."""
    fn = kernel("refine_qs_many", w)
    if fn is None:
        return refine_qs_many_ref(w, t, qs, qscale_max, row_weight, a)
    return fn(w.contiguous(), t.idx32, t.rows32, t.bits32, qs.contiguous(), qscale_max.contiguous(),
              row_weight[:t.span].contiguous(), a)


def refine_qs_many_ref(w: torch.Tensor, t: GroupBatch, qs: torch.Tensor, qscale_max: torch.Tensor,
                       row_weight: torch.Tensor, a: int) -> torch.Tensor:
    """Torch reference of ``refine_qs_many``: :func:`refine_qs` of the batch's rows. The kernel adds
    the errors in another order: where two indices tie within float32 rounding it may choose the
    other."""
    return refine_qs(group_rows(w, t, a), qs, qscale_max, list(t.bits), row_weight[:t.span])


def refine_qs(x: torch.Tensor, qs: torch.Tensor, qscale_max: torch.Tensor, bits: list[int],
              row_weight: torch.Tensor) -> torch.Tensor:
    """The scale-index refinement: for each column, of ``qs - 1``, ``qs`` and ``qs + 1`` (within
    1..16) the index whose effective scale (:func:`exl2conv.pack.dequant_scale`) rounds the group's
    rows with the least weighted squared error ``sum_r row_weight[r] (q s - x)^2``, where
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


# -- the measurement's coded candidates: codes_of, coded_delta --------------------------------------


def codes_of(q: torch.Tensor, scale: torch.Tensor, group: torch.Tensor, zero: torch.Tensor,
             codes: torch.Tensor) -> None:
    """A quantized weight's codes from its dequantized values, written into ``codes``: see
    :func:`codes_of_ref`."""
    fn = kernel("codes_of", q)
    if fn is None or not q.is_contiguous():
        return codes_of_ref(q, scale, group, zero, codes)
    fn(q, scale, group, zero, codes)


def codes_of_ref(q: torch.Tensor, scale: torch.Tensor, group: torch.Tensor, zero: torch.Tensor,
                 codes: torch.Tensor) -> None:
    """Torch reference of ``codes_of``: each value of q (float32 ``[K, N]``, permuted rows) is
    ``fp16(c * s)`` for an integer ``|c| <= 128`` and its row's float16 scale ``s`` (scale: float16
    ``[G, N]``; group: int64 ``[K]``), so ``q / s`` lies within ``128 * 2^-11`` of ``c`` and rounds
    back to it exactly; a zero scale, whose values are all zero, keeps the zero point (zero: int16
    ``[K]``). codes: uint8 ``[K, N]`` (written)."""
    k, n = q.shape
    step = max(1, (32 << 20) // (4 * n))  # rows at a time: a few float32 temporaries of 32 MiB
    for r0 in range(0, k, step):
        s = scale[group[r0:r0 + step]].to(torch.float32)
        c = torch.where(s > 0, torch.round(q[r0:r0 + step] / s), 0).add_(zero[r0:r0 + step].view(-1, 1))
        codes[r0:r0 + step] = c


def decode_coded(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: torch.Tensor,
                 invperm: torch.Tensor, out_features: int) -> torch.Tensor:
    """float16 ``[out_features, K]``: coded weight in the HF orientation and original row order
    (the arguments as for :func:`codes_of_ref`; invperm: int64 ``[K]``)."""
    return dequant(codes, zero.view(-1, 1), scale[group])[invperm][:, :out_features].T


def coded_delta(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: torch.Tensor,
                invperm: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``bfloat16(decoded - base)``: see :func:`coded_delta_ref`."""
    fn = kernel("coded_delta", scale)
    if fn is None or not base.is_contiguous() or base.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return coded_delta_ref(codes, zero, scale, group, invperm, base)
    return fn(codes, zero, scale, group, invperm, base)


def coded_delta_ref(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: torch.Tensor,
                    invperm: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Torch reference of ``coded_delta``: the decoded weight (:func:`decode_coded`) minus ``base``
    (``[out, K]``), in float32, rounded to bfloat16, with the strides of that expression's result
    (``[out, K]``, column-major): what the measurement's corrected forwards take for each candidate.
    A float16 or bfloat16 base is widened first (a float16 difference would round)."""
    dense = decode_coded(codes, zero, scale, group, invperm, base.shape[0])
    if base.dtype != torch.float32:
        return dense.to(torch.float32).sub_(base).to(torch.bfloat16)
    return torch.sub(dense, base).to(torch.bfloat16)  # widens the float16 operand exactly


# -- the EXL2 linear at run time: exl2_dequant, exl2_gemv (csrc/exl2_linear.cu) -------------------
#
# ``t``: one linear's packed tensors (docs/format.md: q_weight, q_scale, q_scale_max (float16),
# q_groups, q_invperm) and the two the kernels derive from them at load, q_perm
# (:func:`exl2conv.pack.q_perm`) and q_map (:func:`exl2conv.pack.chunk_map`);
# :meth:`exl2conv.runtime.linear.Exl2Linear.packed` gives them so.

GEMV_ROWS = 8  # the most rows exl2_gemv takes; more go through exl2_dequant and a matmul


def kernel_args(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The packed tensors of ``t`` in the order exl2_dequant and exl2_gemv take them."""
    return t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_perm"], t["q_map"]


def exl2_dequant(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """float16 ``W^T`` ``[K, N]`` in the model's row order: see :func:`exl2_dequant_ref`."""
    fn = kernel("exl2_dequant", t["q_weight"])
    if fn is None:
        return exl2_dequant_ref(t)
    return fn(*kernel_args(t))


def exl2_dequant_ref(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Torch reference of ``exl2_dequant``: :func:`exl2conv.pack.decode_linear`, the weight the
    runtime's reconstruct builds, bit for bit (the kernel must equal it exactly). Returns float16
    ``[K, N]``, rows in the model's order, all N (padded) columns."""
    return decode_linear({k: t[k] for k in QUANT_KEYS})


def exl2_gemv(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x @ W^T`` for float16 ``x`` ``[B, K]``, B = 1..8: see :func:`exl2_gemv_ref`."""
    fn = kernel("exl2_gemv", x)
    if fn is None or x.dtype != torch.float16 or x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_ROWS:
        return exl2_gemv_ref(x, t)
    return fn(x.contiguous(), *kernel_args(t))


def exl2_gemv_ref(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Torch reference of ``exl2_gemv``: the decoded weight (:func:`exl2_dequant_ref`) times x
    (``[B, K]``), summed in float64 (exact products of the fp16 operands; no TF32 on a GPU) and
    rounded once to x's dtype: float16 ``[B, N]``, all N columns. The kernel sums in float32 and
    applies each group's scale once per 32 rows, so it comes within ``2^-10 * (|x| @ |W|)`` plus
    one float16 step of the result (tests/opcases.py)."""
    w = exl2_dequant_ref(t)
    return (x.to(torch.float64) @ w.to(torch.float64)).to(x.dtype)


REGISTRY: dict[str, Op] = {
    "gptq_block": Op(gptq_block, gptq_block_ref, fused=False),
    "pgrid_err_many": Op(pgrid_err_many, pgrid_err_many_ref, fused=False),
    "refine_qs_many": Op(refine_qs_many, refine_qs_many_ref, fused=False),
    "codes_of": Op(codes_of, codes_of_ref, fused=True),
    "coded_delta": Op(coded_delta, coded_delta_ref, fused=True),
    "params_start": Op(params_start, params_start_ref, fused=True),
    "params_finish": Op(params_finish, params_finish_ref, fused=True),
    "exl2_dequant": Op(exl2_dequant, exl2_dequant_ref, fused=False),
    "exl2_gemv": Op(exl2_gemv, exl2_gemv_ref, fused=True),
}
