"""The EXL2 linear kernels' reading of the packed tensors (csrc/exl2_linear_kernels.cuh), emulated
in torch on the CPU: the chunk map, the word and bit arithmetic of code_at, the scales, the row
permutation, and the gemv's per-chunk sums, against the decoder. The kernels themselves run in
tests/gpu/test_exl2_linear.py; this catches a wrong layout reading without a GPU."""

import pytest
import torch

from exl2conv import ops
from exl2conv.pack import decode_linear, dequant_scale, unpack_qscale
from exl2conv.qparams import Group
from tests.opcases import exl2_linear, gemv_bound, gemv_check, hand_packed

CHUNK = 32


def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def _code_at(words: list[torch.Tensor], bits: int, i: int) -> torch.Tensor:
    """code_at<BITS>: row i's code from the chunk's words (int64 holding uint32), a straddling code
    joined as __funnelshift_r joins it."""
    bit = i * bits
    j, off = divmod(bit, 32)
    if off + bits <= 32:
        v = words[j] >> off
    else:
        v = ((words[j] >> off) | (words[j + 1] << (32 - off))) & 0xFFFFFFFF
    return v & ((1 << bits) - 1)


def _chunks(t: dict):
    """Per chunk: (index, bits, rows, words as load_words gives them, fp16 scales as float32)."""
    qw = _u32(t["q_weight"])
    scale = dequant_scale(unpack_qscale(t["q_scale"]), t["q_scale_max"]).float()  # group_scales
    for c, (qrow, bits, group, rows) in enumerate(t["q_map"].tolist()):
        nwords = rows * bits // 32
        words = [qw[qrow + j] if j < nwords else torch.zeros_like(qw[0]) for j in range(bits)]
        yield c, bits, rows, words, scale[group]


def emulate_dequant(t: dict) -> torch.Tensor:
    """dequant_kernel: row i of chunk c, fp16((code - zero) * scale), written to row perm[32c + i]."""
    rows_out = []
    for c, bits, rows, words, s in _chunks(t):
        for i in range(rows):
            rows_out.append(((_code_at(words, bits, i) - (1 << (bits - 1))).float() * s).half())
    out = torch.full((len(rows_out), t["q_weight"].shape[1]), float("nan"), dtype=torch.float16)
    out[t["q_perm"].long()] = torch.stack(rows_out)
    return out


def emulate_gemv(x: torch.Tensor, t: dict) -> torch.Tensor:
    """gemv_kernel's arithmetic: x gathered through perm, float32 sums of x * (code - zero) over each
    chunk, times the chunk's scale; then rounded to fp16 (the order of the chunk sums aside)."""
    perm = t["q_perm"].long()
    xp = x.float()[:, perm]
    acc = torch.zeros(x.shape[0], t["q_weight"].shape[1])
    for c, bits, rows, words, s in _chunks(t):
        part = torch.zeros_like(acc)
        for i in range(rows):
            q = (_code_at(words, bits, i) - (1 << (bits - 1))).float()
            part += xp[:, c * CHUNK + i:c * CHUNK + i + 1] * q
        acc += part * s
    return acc.half()


LAYOUTS = {
    "gptq": lambda: exl2_linear(),
    # the last group of 16 2-bit rows: half a chunk, one word per column
    "partial": lambda: hand_packed(80, 64, [Group(6, 32), Group(3, 32), Group(2, 16)], 1),
    # the last group of 4 8-bit rows
    "partial8": lambda: hand_packed(36, 32, [Group(8, 32), Group(8, 4)], 2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_kernels_reading_decodes_as_the_decoder(layout):
    t = LAYOUTS[layout]()
    assert torch.equal(emulate_dequant(t), decode_linear(t))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_gemv_arithmetic_is_within_its_stated_bound(layout):
    t = LAYOUTS[layout]()
    x = torch.randn(3, t["q_perm"].numel(), generator=torch.Generator().manual_seed(4)).half()
    got, want = emulate_gemv(x, t), ops.exl2_gemv_ref(x, t)
    gemv_check((got, gemv_bound(x, t)), (want, None))


def test_chunk_map_follows_q_groups():
    t = exl2_linear()
    m = t["q_map"]
    assert m.dtype == torch.int32 and m.shape == (544 // 32, 4)
    starts = t["q_groups"][1::2].tolist()
    # each group's first chunk starts at the group's packed row; chunks follow one another
    for qrow, bits, group, rows in m.tolist():
        assert rows == 32 and qrow >= starts[group]
    assert torch.equal(m[1:, 0], m[:-1, 0] + m[:-1, 1])
    assert torch.equal(t["q_invperm"].long()[t["q_perm"].long()], torch.arange(544))
