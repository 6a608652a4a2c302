"""EXL2 tensor packing, unpacking and decoding in torch: the reference the CUDA kernels are checked against.

The tensors of one quantized linear (docs/format.md), for K input features (rows of ``Wt = W^T``),
padded width N (a multiple of 32) and G groups, rows in permuted (act-order) order:

    q_weight     int32 [sum_g rows_g*bits_g/32, N]  each group's codes as a little-endian bit stream down
                                                    each column: row i of a group at stream bits
                                                    [i*b, i*b+b), stream bit t in word t//32 at bit t%32
    q_scale      int32 [G, N/8]   scale index qs in 1..16 stored as qs-1; column 8w+j at bits 4j..4j+3 of word w
    q_scale_max  fp16  [G]
    q_groups     int16 [2G]       (bits, first packed row) per group
    q_invperm    int32 [K]        original row r sits at permuted row invperm[r]
    bias         fp16  [N]        only for linears that have one

Every function works on CPU or CUDA tensors and is vectorised over rows and columns; the only Python loops
run over runs of equal bit width and over the few words of one packing unit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import FormatError
from .qparams import VALID_BITS, Group

QUANT_KEYS = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
LINEAR_KEYS = QUANT_KEYS + ("bias",)

_MASK32 = 0xFFFFFFFF


# -- bit-level helpers ----------------------------------------------------------------------------


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same 32 bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 (or int16) words -> int64 holding their unsigned value."""
    mask = 0xFFFF if words.dtype == torch.int16 else _MASK32
    return words.to(torch.int64) & mask


def _unit(bits: int) -> tuple[int, int]:
    """(rows, words) of the smallest packing unit: a whole number of rows filling whole words."""
    rows = 32 // math.gcd(bits, 32)
    return rows, rows * bits // 32


@dataclass(frozen=True)
class _Run:
    """Consecutive groups of one bit width. Packing units never cross a group boundary and every
    group holds whole units, so a run packs exactly like its groups packed one by one."""

    bits: int
    row: int    # first row (permuted order)
    rows: int
    qrow: int   # first packed row
    qrows: int


def _runs(groups: list[Group]) -> list[_Run]:
    """Merge consecutive equal-bit groups; raises ValueError on a group that cannot be packed."""
    runs: list[_Run] = []
    row = qrow = 0
    for g in groups:
        if g.bits not in VALID_BITS:
            raise ValueError(f"no {g.bits}-bit EXL2 format; bit widths are {VALID_BITS}")
        if g.rows <= 0 or (g.rows * g.bits) % 32:
            raise ValueError(f"a {g.bits}-bit group of {g.rows} rows does not fill whole 32-bit words")
        qrows = g.rows * g.bits // 32
        if runs and runs[-1].bits == g.bits:
            last = runs[-1]
            runs[-1] = _Run(g.bits, last.row, last.rows + g.rows, last.qrow, last.qrows + qrows)
        else:
            runs.append(_Run(g.bits, row, g.rows, qrow, qrows))
        row += g.rows
        qrow += qrows
    return runs


def packed_rows(groups: list[Group]) -> int:
    """Rows of q_weight for this layout: sum of rows*bits/32."""
    return sum(g.rows * g.bits // 32 for g in groups)


# -- q_weight -------------------------------------------------------------------------------------


def pack_qweight(codes: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """Pack codes into the q_weight bit streams (docs/format.md).

    codes: int [K, N], rows in permuted order, values 0..2^b-1 for the group's b; N a multiple of 32.
    groups: the layout, covering exactly K rows.
    Returns int32 [sum_g rows_g*bits_g/32, N].
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {list(codes.shape)}")
    k, n = codes.shape
    if n % 32 or n == 0:
        raise ValueError(f"N = {n} columns: EXL2 needs a positive multiple of 32 (pad the output features first)")
    if sum(g.rows for g in groups) != k:
        raise ValueError(f"the groups cover {sum(g.rows for g in groups)} rows but codes has K = {k}")
    out = torch.zeros((packed_rows(groups), n), dtype=torch.int32, device=codes.device)
    for r in _runs(groups):
        c = codes[r.row:r.row + r.rows]
        maxq = (1 << r.bits) - 1
        if bool(((c < 0) | (c > maxq)).any()):
            raise ValueError(f"codes of a {r.bits}-bit group must be in 0..{maxq}")
        c = c.to(torch.int32)
        unit_rows, unit_words = _unit(r.bits)
        c = c.reshape(-1, unit_rows, n)
        words = out[r.qrow:r.qrow + r.qrows].view(-1, unit_words, n)
        # One step per code position inside the unit, each over all units and columns at once.
        # int32 shifts wrap like the 32-bit words they build; codes occupy disjoint bits.
        for i in range(unit_rows):
            w, off = divmod(i * r.bits, 32)
            words[:, w] |= c[:, i] << off
            if off + r.bits > 32:
                words[:, w + 1] |= c[:, i] >> (32 - off)
    return out


def unpack_qweight(q_weight: torch.Tensor, groups: list[Group], k: int) -> torch.Tensor:
    """Inverse of pack_qweight.

    q_weight: int32 [sum_g rows_g*bits_g/32, N]; groups covering k rows.
    Returns int32 [K, N] codes in permuted row order.
    """
    if sum(g.rows for g in groups) != k:
        raise ValueError(f"the groups cover {sum(g.rows for g in groups)} rows, expected K = {k}")
    runs = _runs(groups)
    if q_weight.dim() != 2 or q_weight.shape[0] != packed_rows(groups):
        raise ValueError(f"q_weight must have {packed_rows(groups)} rows for this layout, "
                         f"got shape {list(q_weight.shape)}")
    n = q_weight.shape[1]
    q_weight = q_weight.to(torch.int32)
    codes = torch.empty((k, n), dtype=torch.int32, device=q_weight.device)
    for r in runs:
        _unpack_into(codes[r.row:r.row + r.rows], q_weight[r.qrow:r.qrow + r.qrows], r.bits)
    return codes


def _unpack_into(c: torch.Tensor, words: torch.Tensor, bits: int) -> None:
    """The ``bits``-bit codes of whole packing units: int32 ``words`` [units * unit_words, N] ->
    int32 ``c`` [units * unit_rows, N]."""
    n = words.shape[1]
    unit_rows, unit_words = _unit(bits)
    words = words.reshape(-1, unit_words, n)
    c = c.view(-1, unit_rows, n)
    mask = (1 << bits) - 1
    for i in range(unit_rows):
        w, off = divmod(i * bits, 32)
        # The mask also drops the sign bits an arithmetic shift of int32 brings in.
        code = (words[:, w] >> off) & mask
        spill = off + bits - 32
        if spill > 0:
            code = (code & ((1 << (32 - off)) - 1)) | ((words[:, w + 1] & ((1 << spill) - 1)) << (32 - off))
        c[:, i] = code


# -- q_scale --------------------------------------------------------------------------------------


def pack_qscale(qs: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit scale indices (docs/format.md).

    qs: int [G, N], values 1..16, N a multiple of 8. Returns int32 [G, N/8] holding qs-1 in nibbles.
    """
    if qs.dim() != 2 or qs.shape[1] % 8:
        raise ValueError(f"qs must be [G, N] with N a multiple of 8, got shape {list(qs.shape)}")
    q = qs.to(torch.int64)
    if bool(((q < 1) | (q > 16)).any()):
        raise ValueError("scale indices must be in 1..16")
    g, n = q.shape
    shift = torch.arange(8, device=qs.device, dtype=torch.int64) * 4
    return _to_int32(((q - 1).reshape(g, n // 8, 8) << shift).sum(-1))


def unpack_qscale(q_scale: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_qscale: int32 [G, N/8] -> int32 [G, N] scale indices in 1..16."""
    g, w = q_scale.shape
    shift = torch.arange(8, device=q_scale.device, dtype=torch.int64) * 4
    qs = (_to_uint(q_scale).unsqueeze(-1) >> shift) & 15
    return (qs + 1).reshape(g, w * 8).to(torch.int32)


# -- q_groups -------------------------------------------------------------------------------------


def make_q_groups(groups: list[Group]) -> torch.Tensor:
    """int16 [2G]: (bits, first packed row) per group (docs/format.md)."""
    _runs(groups)  # validates bit widths and whole-word groups
    pairs = []
    qrow = 0
    for g in groups:
        pairs += [g.bits, qrow]
        qrow += g.rows * g.bits // 32
    if qrow > 32767:
        raise ValueError(f"{qrow} packed rows do not fit q_groups' int16 start offsets")
    return torch.tensor(pairs, dtype=torch.int16)


def parse_q_groups(q_groups: torch.Tensor, k: int, name: str = "q_groups") -> list[Group]:
    """Read the layout back from q_groups the way the loader does: a group's rows come from the gap
    to the next group's start, the last group takes the K rows left over.

    q_groups: int [2G]; k: the linear's input features; name: the tensor's name, for messages.
    Raises FormatError naming the tensor when the layout is not one ExLlamaV2's kernels can run.
    """
    v = q_groups.detach().to("cpu", torch.int64).reshape(-1).tolist()
    if q_groups.dim() != 1 or len(v) < 2 or len(v) % 2:
        raise FormatError(f"{name}: expected a 1-D tensor of (bits, start) pairs, got shape {list(q_groups.shape)}")
    bits, starts = v[0::2], v[1::2]
    where = f"{name}: group"
    for i, b in enumerate(bits):
        if b not in VALID_BITS:
            raise FormatError(f"{where} {i} has {b} bits; EXL2 bit widths are {VALID_BITS}")
        if i and b > bits[i - 1]:
            raise FormatError(f"{where} {i} has {b} bits after {bits[i - 1]}: bit widths must not increase "
                              "(the kernels expect 8-bit rows first, then 6, 5, 4, 3, 2)")
    if starts[0] != 0:
        raise FormatError(f"{where} 0 starts at packed row {starts[0]}, expected 0")
    groups = []
    for i in range(len(bits) - 1):
        gap = starts[i + 1] - starts[i]
        rows = gap * 32 // bits[i]
        if gap <= 0 or rows * bits[i] != gap * 32 or rows % 32:
            raise FormatError(f"{where} {i} spans {gap} packed rows, which is not a whole number of "
                              f"32-row blocks at {bits[i]} bits")
        groups.append(Group(bits[i], rows))
    last = k - sum(g.rows for g in groups)
    if last <= 0 or (last * bits[-1]) % 32:
        raise FormatError(f"{name}: the groups before the last cover {k - last} rows, leaving {last} of "
                          f"K = {k} for the last {bits[-1]}-bit group (counts are inconsistent)")
    groups.append(Group(bits[-1], last))
    return groups


# -- fp16 dequantization (bit-exact with the runtime's reconstruct) --------------------------------


def qzero(bits: int) -> int:
    """The zero point of ``bits``-bit codes: code ``2^(bits-1)`` stands for 0."""
    return 1 << (bits - 1)


def maxq(bits: int) -> int:
    """The largest ``bits``-bit code."""
    return (1 << bits) - 1


def dequant_scale(qs_idx: torch.Tensor, q_scale_max: torch.Tensor) -> torch.Tensor:
    """Per-group, per-column scales in the runtime's fp16 arithmetic (docs/format.md; ExLlamaV2's
    ext.py, make_q_matrix).

    qs_idx: int [..., N] in 1..16; q_scale_max: [...] (any float, rounded to fp16 first). Returns fp16 [..., N]:
    fp16( fp16(qs^2) * fp16(q_scale_max / 256) ).
    A single fp16*fp16 product is exact in float32, so torch's widen-multiply-round on half tensors
    is the correctly rounded IEEE half product the CUDA runtime computes. (The runtime's extra
    ``prescale`` for scale_depth / logit_scale models is not part of the file and is left out.)
    GPTQ's scale search and the measurement's candidates use it too: the scales they choose by are
    the ones the runtime decodes with.
    """
    qs2 = (qs_idx.to(torch.int32) ** 2).to(torch.float16)       # <= 256: exact
    maxs = q_scale_max.to(torch.float16) * (1.0 / 256)            # rounds only when subnormal, as at load
    return qs2 * maxs.unsqueeze(-1)


def dequant(codes: torch.Tensor, zero: int | torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp16( fp16(code - zero) * fp16(scale) ): the runtime's reconstruction of one value, which
    GPTQ's rounding (:func:`exl2conv.ops.gptq_block_ref`) and the measurement's candidates
    (:class:`exl2conv.coded.Coded`) reproduce too.

    codes: integer codes, or float tensors holding integers (GPTQ's rounded rows); byte-sized
    codes are widened first, so that subtracting the zero point cannot wrap. zero and scale
    broadcast to codes. Returns fp16 of the broadcast shape.
    """
    if not codes.is_floating_point():
        codes = codes.to(torch.int16 if codes.element_size() == 1 else torch.int32)
    q = (codes - zero).to(torch.float16)
    scale = scale.to(torch.float16)
    if torch.broadcast_shapes(q.shape, scale.shape) == q.shape:
        return q.mul_(scale)  # no second temporary of the result's size
    return q * scale


def dequant_codes(codes: torch.Tensor, bits: int | torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`dequant` with each row's zero point ``2^(b-1)`` from its bit width.

    codes: int [rows, N]; bits: an int, or an int tensor broadcastable to codes (e.g. [rows, 1]);
    scale: fp16 broadcastable to codes ([N] or [rows, N]). Returns fp16 [rows, N].
    """
    if isinstance(bits, torch.Tensor):
        zero = torch.bitwise_left_shift(torch.ones_like(bits, dtype=torch.int32), bits.to(torch.int32) - 1)
    else:
        zero = 1 << (bits - 1)
    return dequant(codes.to(torch.int32), zero, scale)


# -- one linear -----------------------------------------------------------------------------------


def pack_linear(codes: torch.Tensor, qs: torch.Tensor, q_scale_max: torch.Tensor, groups: list[Group],
                invperm: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear, without a key prefix (docs/format.md).

    codes: int [K, N] in permuted order; qs: int [G, N] in 1..16; q_scale_max: [G] (stored as fp16);
    groups: the G groups; invperm: int [K]; bias: [N] or None.
    Returns {q_weight int32, q_scale int32, q_scale_max fp16, q_groups int16, q_invperm int32[, bias fp16]}.
    """
    k, n = codes.shape
    g = len(groups)
    if tuple(qs.shape) != (g, n):
        raise ValueError(f"qs must be [G, N] = [{g}, {n}], got {list(qs.shape)}")
    if tuple(q_scale_max.shape) != (g,):
        raise ValueError(f"q_scale_max must be [G] = [{g}], got {list(q_scale_max.shape)}")
    if tuple(invperm.shape) != (k,):
        raise ValueError(f"invperm must be [K] = [{k}], got {list(invperm.shape)}")
    out = {
        "q_weight": pack_qweight(codes, groups),
        "q_scale": pack_qscale(qs),
        "q_scale_max": q_scale_max.to(torch.float16).contiguous(),
        "q_groups": make_q_groups(groups).to(codes.device),
        "q_invperm": invperm.to(torch.int32).contiguous(),
    }
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [N] = [{n}], got {list(bias.shape)}")
        out["bias"] = bias.to(torch.float16).contiguous()
    return out


@dataclass(frozen=True)
class LinearInfo:
    """What the tensors of one quantized linear say about it once checked."""

    k: int
    n: int
    groups: list[Group]
    has_bias: bool


def _key(name: str, tensor: str) -> str:
    return f"{name}.{tensor}" if name else tensor


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _expect(tensors: dict[str, torch.Tensor], name: str, key: str, dtypes: tuple[torch.dtype, ...],
            symbolic: str, shape: tuple[int, ...]) -> None:
    t = tensors[key]
    if t.dtype not in dtypes or tuple(t.shape) != shape:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FormatError(f"{_key(name, key)}: expected {want} {symbolic} = {list(shape)}, got {_describe(t)}")


def check_linear(tensors: dict[str, torch.Tensor], name: str = "") -> LinearInfo:
    """Validate the tensors of one quantized linear against the loader's checklist (ExLlamaV2's linear.py
    and ext.py, make_q_matrix).

    tensors: the linear's tensors keyed without prefix (q_weight, q_scale, ...); name: its key, for
    messages. Reads only q_groups, q_scale_max and q_invperm values (small). Raises FormatError naming
    the offending tensor.
    """
    for key in QUANT_KEYS:
        if key not in tensors:
            raise FormatError(f"{_key(name, key)}: missing (a quantized linear needs {', '.join(QUANT_KEYS)})")
    qw, qg, qi = tensors["q_weight"], tensors["q_groups"], tensors["q_invperm"]
    if qw.dtype != torch.int32 or qw.dim() != 2 or qw.shape[1] % 32 or qw.shape[1] == 0:
        raise FormatError(f"{_key(name, 'q_weight')}: expected int32 [packed rows, N] with N a positive "
                          f"multiple of 32, got {_describe(qw)}")
    n = qw.shape[1]
    if qg.dtype != torch.int16 or qg.dim() != 1:
        raise FormatError(f"{_key(name, 'q_groups')}: expected int16 [2G], got {_describe(qg)}")
    if qi.dtype not in (torch.int32, torch.int16) or qi.dim() != 1 or qi.numel() == 0:
        raise FormatError(f"{_key(name, 'q_invperm')}: expected int32 or int16 [K], got {_describe(qi)}")
    k = qi.numel()
    groups = parse_q_groups(qg, k, _key(name, "q_groups"))
    g = len(groups)
    _expect(tensors, name, "q_weight", (torch.int32,), "[sum rows*bits/32, N]", (packed_rows(groups), n))
    _expect(tensors, name, "q_scale", (torch.int32,), "[G, N/8]", (g, n // 8))
    _expect(tensors, name, "q_scale_max", (torch.float16,), "[G]", (g,))
    if "bias" in tensors:
        _expect(tensors, name, "bias", (torch.float16,), "[N]", (n,))
    if not bool(torch.isfinite(tensors["q_scale_max"]).all()):
        raise FormatError(f"{_key(name, 'q_scale_max')}: holds inf or NaN")
    perm = torch.sort(_to_uint(qi).cpu()).values
    if not torch.equal(perm, torch.arange(k, dtype=torch.int64)):
        raise FormatError(f"{_key(name, 'q_invperm')}: not a permutation of 0..{k - 1}")
    return LinearInfo(k, n, groups, "bias" in tensors)


def decode_linear(tensors: dict[str, torch.Tensor], name: str = "") -> torch.Tensor:
    """Dequantize one linear as the runtime's reconstruct does, bit for bit.

    tensors: q_weight, q_scale, q_scale_max, q_groups, q_invperm (bias ignored), keyed without prefix.
    Returns fp16 Wt [K, N] in ORIGINAL row order (HF weight = Wt.T[:out_features]). Unlike the runtime's
    MLP weights (ExLlamaV2's mlp.py, load), no load-time permutation of the intermediate dimension is applied.
    Raises FormatError naming the tensor when the tensors are inconsistent.
    """
    info = check_linear(tensors, name)
    q_weight = tensors["q_weight"].to(torch.int32)
    device, n = q_weight.device, info.n
    scale = dequant_scale(unpack_qscale(tensors["q_scale"]), tensors["q_scale_max"])      # [G, N]
    group = torch.repeat_interleave(torch.arange(len(info.groups)),
                                    torch.tensor([g.rows for g in info.groups])).to(device)
    # permuted row j is original row perm[j] (q_invperm maps each original row to its permuted one)
    perm = torch.argsort(_to_uint(tensors["q_invperm"]).to(device))
    out = torch.empty((info.k, n), dtype=torch.float16, device=device)
    # a slice of whole packing units at a time: the int32 codes and float16 values of a slice are
    # the only temporaries (whole, they were 3x the output: 1.3 GiB for a Llama-2-7B head)
    for r in _runs(info.groups):
        unit_rows, unit_words = _unit(r.bits)
        step = max(1, (_DECODE_BYTES // (4 * n)) // unit_rows) * unit_rows
        for r0 in range(0, r.rows, step):
            rows = min(step, r.rows - r0)
            q0 = r.qrow + r0 // unit_rows * unit_words
            codes = torch.empty((rows, n), dtype=torch.int32, device=device)
            _unpack_into(codes, q_weight[q0:q0 + rows // unit_rows * unit_words], r.bits)
            at = r.row + r0
            out.index_copy_(0, perm[at:at + rows], dequant_codes(codes, r.bits, scale[group[at:at + rows]]))
    return out


_DECODE_BYTES = 32 << 20  # int32 codes decoded at a time (decode_linear)


# -- what the CUDA kernels derive at load (csrc/exl2_linear_kernels.cuh) ----------------------------

CHUNK_ROWS = 32  # every group but the last spans a multiple of 32 rows: 32 rows of b bits are b words


def chunk_map(groups: list[Group]) -> torch.Tensor:
    """int32 ``[ceil(K/32), 4]``: per 32-row chunk of the permuted rows, (first packed row, bits,
    group, rows), where only the last chunk may hold fewer than 32 rows. The kernels' unit of work:
    one bit width and one scale per column, ``bits`` consecutive words down each column. Built from
    :func:`parse_q_groups`' layout, as ExLlamaV2 builds its q_group_map at load."""
    rows: list[list[int]] = []
    qrow = 0
    for gi, g in enumerate(groups):
        if gi < len(groups) - 1 and g.rows % CHUNK_ROWS:
            raise ValueError(f"group {gi} spans {g.rows} rows; all but the last must span multiples of 32")
        for r0 in range(0, g.rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, g.rows - r0)
            rows.append([qrow, g.bits, gi, n])
            qrow += n * g.bits // 32
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)


def q_perm(q_invperm: torch.Tensor) -> torch.Tensor:
    """int32 ``[K]``: the model row each permuted (stored) row holds, ``argsort(q_invperm)``; the
    loader derives it (docs/format.md)."""
    return torch.argsort(_to_uint(q_invperm)).to(torch.int32)


def decoded_bits(tensors: dict[str, torch.Tensor], name: str = "") -> int:
    """Stored bits of one linear, from its tensors: weight bits + G*16 + G*32 + G*N*4 + K*32 (+16*N
    with a bias): the same count as QParams.total_bits."""
    info = check_linear(tensors, name)
    g = len(info.groups)
    bits = packed_rows(info.groups) * 32 * info.n + g * 16 + g * 32 + g * info.n * 4 + info.k * 32
    return bits + (16 * info.n if info.has_bias else 0)


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def find_linears(names: Iterable[str]) -> list[str]:
    """Keys of the quantized linears among tensor names (those with a ``.q_weight``), in natural
    order (layer 2 before layer 10)."""
    suffix = ".q_weight"
    return sorted({s[: -len(suffix)] for s in names if s.endswith(suffix)}, key=_natural)


# -- the biases of a dense MLP's gate and up projections ------------------------------------------
#
# ExLlamaV2 0.3.2 loads an MLP's gate_proj and up_proj with their output columns reordered by the
# down projection's q_perm (exllamav2/mlp.py: ``output_map = down_map``; ext_stloader.cpp's
# tensor_remap: new column c = old column q_perm[c]), so that down_proj then reads its input in its
# own order; it reorders q_weight and q_scale but adds the bias as stored. An EXL2 file therefore
# stores these two biases in that runtime order, ``b[q_perm]``: ExLlamaV2 then adds each element to
# the column it belongs to (docs/format.md). A file with ``b`` as is (what ExLlamaV2's convert.py
# writes) runs with the bias misplaced: GPT-2's logits came out 40 % off on the GPU.


def mlp_bias_to_runtime_order(bias: torch.Tensor, down_invperm: torch.Tensor) -> torch.Tensor:
    """A gate/up bias (padded to the linear's N) as stored: its first K(down) entries in the order
    of down_proj's q_perm (argsort of its q_invperm), the padding after them unchanged."""
    k = down_invperm.numel()
    out = bias.clone()
    out[:k] = bias[:k][torch.argsort(down_invperm.long())]
    return out


def mlp_bias_from_runtime_order(stored: torch.Tensor, down_invperm: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`mlp_bias_to_runtime_order`: the bias in the model's own order."""
    k = down_invperm.numel()
    out = stored.clone()
    out[:k] = stored[:k][down_invperm.long()]
    return out
