import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from exl2conv.errors import FormatError
from exl2conv.pack import (
    QUANT_KEYS, check_linear, decode_linear, decoded_bits, dequant_codes, dequant_scale, find_linears,
    make_q_groups, pack_linear, pack_qscale, pack_qweight, parse_q_groups, unpack_qscale, unpack_qweight,
)
from exl2conv.qparams import HEAD_OPTIONS, Group, QParams, describe_groups, known_qparams, qp

WIDTHS = (2, 3, 4, 5, 6, 8)


def random_codes(groups: list[Group], n: int, gen: torch.Generator) -> torch.Tensor:
    """int64 [K, N] codes, each row within its group's bit width."""
    bits = torch.tensor([g.bits for g in groups]).repeat_interleave(torch.tensor([g.rows for g in groups]))
    k = int(bits.numel())
    raw = torch.randint(0, 256, (k, n), generator=gen)
    return raw & ((1 << bits) - 1).unsqueeze(1)


def stream_oracle(codes: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """Pure-Python big-integer model of 6.2: per group and column, row i at stream bits [i*b, i*b+b)."""
    out = []
    row = 0
    for g in groups:
        words = g.rows * g.bits // 32
        block = [[0] * codes.shape[1] for _ in range(words)]
        for col in range(codes.shape[1]):
            stream = 0
            for i in range(g.rows):
                stream |= int(codes[row + i, col]) << (i * g.bits)
            for w in range(words):
                v = (stream >> (32 * w)) & 0xFFFFFFFF
                block[w][col] = v - (1 << 32) if v >= 1 << 31 else v
        out += block
        row += g.rows
    return torch.tensor(out, dtype=torch.int32)


# -- q_weight ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("k", [32, 64, 96, 576, 1536])
@pytest.mark.parametrize("n", [32, 64, 576])
def test_round_trip_single_width(bits, k, n):
    gen = torch.Generator().manual_seed(bits * 1000 + k + n)
    groups = qp((bits, 32, 1)).groups(k)
    codes = random_codes(groups, n, gen)
    q = pack_qweight(codes, groups)
    assert q.dtype == torch.int32 and tuple(q.shape) == (k * bits // 32, n)
    assert torch.equal(unpack_qweight(q, groups, k), codes.to(torch.int32))


@pytest.mark.parametrize("k", [64, 96, 576, 1536])
@pytest.mark.parametrize("n", [32, 96])
def test_round_trip_every_table_layout(k, n):
    gen = torch.Generator().manual_seed(k + n)
    for q in known_qparams():
        try:
            groups = q.groups(k)
        except ValueError:
            continue
        codes = random_codes(groups, n, gen)
        packed = pack_qweight(codes, groups)
        assert packed.shape[0] == sum(g.rows * g.bits for g in groups) // 32, q.desc
        assert torch.equal(unpack_qweight(packed, groups, k), codes.to(torch.int32)), q.desc


@pytest.mark.parametrize("layout", [qp((b, 32, 1)) for b in WIDTHS] + [
    qp((8, 32, 0.05), (6, 32, 0.1), (5, 32, 0.85)),
    qp((6, 32, 0.05), (3, 64, 0.2), (2, 64, 0.75)),
    qp((5, 32, 0.1), (4, 32, 0.9)),
], ids=lambda q: q.desc)
def test_packing_matches_bit_stream_oracle(layout):
    gen = torch.Generator().manual_seed(7)
    groups = layout.groups(192)
    codes = random_codes(groups, 32, gen)
    assert torch.equal(pack_qweight(codes, groups), stream_oracle(codes, groups))


def one_column(bits: int, rows: dict[int, int]) -> list[int]:
    """Pack a single 32-row group whose column 0 holds the given codes (others 0); words of column 0."""
    codes = torch.zeros((32, 32), dtype=torch.int64)
    for r, c in rows.items():
        codes[r, 0] = c
    q = pack_qweight(codes, [Group(bits, 32)])
    assert not q[:, 1:].any()
    return q[:, 0].tolist()


def u32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def test_hand_checked_words():
    # 3-bit row 10 = 0b110: bits 30-31 of word0 get its low bits "10", word1 bit 0 its top bit.
    assert one_column(3, {10: 0b110}) == [u32(0x80000000), 1, 0]
    # 3-bit row 21 = 0b111: word1 bit 31, then word2 bits 0-1.
    assert one_column(3, {21: 0b111}) == [0, u32(0x80000000), 0b11]
    assert one_column(3, {11: 1, 31: 0b101}) == [0, 1 << 1, u32(0b101 << 29)]
    # 5-bit rows 6, 12, 19, 25 straddle words 0/1, 1/2, 2/3, 3/4.
    assert one_column(5, {6: 0b10111}) == [u32(0xC0000000), 0b101, 0, 0, 0]
    assert one_column(5, {12: 0b11111}) == [0, u32(0xF0000000), 0b1, 0, 0]
    assert one_column(5, {19: 0b10011}) == [0, 0, u32(0x80000000), 0b1001, 0]
    assert one_column(5, {25: 0b11001}) == [0, 0, 0, u32(0x20000000), 0b11]
    # 6-bit rows 5 (w0@30) and 10 (w1@28); the 32 rows make two 16-row units.
    assert one_column(6, {5: 0b111101}) == [u32(0x40000000), 0b1111, 0, 0, 0, 0]
    assert one_column(6, {10: 0b101011}) == [0, u32(0xB0000000), 0b10, 0, 0, 0]
    assert one_column(6, {16: 0b111111}) == [0, 0, 0, 0b111111, 0, 0]
    # Whole-word formats.
    assert one_column(2, {i: i % 4 for i in range(32)}) == [u32(0xE4E4E4E4)] * 2
    assert one_column(4, {i: i for i in range(8)} | {8: 15}) == [0x76543210, 15, 0, 0]
    assert one_column(8, {0: 0x11, 1: 0x22, 2: 0x33, 3: 0xFF, 4: 0x80}) == [u32(0xFF332211), 0x80] + [0] * 6


def test_pack_qweight_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_qweight(torch.zeros((32, 48), dtype=torch.int64), [Group(4, 32)])
    with pytest.raises(ValueError, match="0..15"):
        pack_qweight(torch.full((32, 32), 16), [Group(4, 32)])
    with pytest.raises(ValueError, match="cover"):
        pack_qweight(torch.zeros((64, 32), dtype=torch.int64), [Group(4, 32)])
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack_qweight(torch.zeros((16, 32), dtype=torch.int64), [Group(3, 16)])


# -- q_scale and q_groups ----------------------------------------------------------------------------


def test_qscale_nibble_order_and_round_trip():
    qs = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 16, 16, 1, 1, 1, 1, 1, 9]])
    packed = pack_qscale(qs)
    assert packed.dtype == torch.int32 and packed.tolist() == [[0x76543210, u32(0x800000FF)]]
    gen = torch.Generator().manual_seed(3)
    qs = torch.randint(1, 17, (12, 576), generator=gen)
    assert torch.equal(unpack_qscale(pack_qscale(qs)), qs.to(torch.int32))
    with pytest.raises(ValueError):
        pack_qscale(torch.zeros((1, 8), dtype=torch.int64))


REFERENCE_LAYOUTS = [  # reference 5.3
    (4096, qp((3, 64, 0.05), (2, 64, 0.95)), [(3, 0), (3, 6), (3, 12), (3, 18), (2, 24), (2, 28)], (2, 260), 264),
    (11008, qp((8, 32, 0.05), (4, 128, 0.1), (3, 128, 0.85)), [(8, 0), (8, 8), (8, 16)], (3, 1152), 1158),
    (4096, HEAD_OPTIONS[6], [(8, 0), (8, 32), (8, 64), (8, 96), (8, 128), (6, 160)], (6, 784), 808),
]


@pytest.mark.parametrize("k,layout,first,last,qrows", REFERENCE_LAYOUTS, ids=lambda x: str(x)[:30])
def test_q_groups_reference_examples(k, layout, first, last, qrows):
    groups = layout.groups(k)
    qg = make_q_groups(groups)
    assert qg.dtype == torch.int16
    pairs = [tuple(p) for p in qg.view(-1, 2).tolist()]
    assert pairs[:len(first)] == first and pairs[-1] == last
    assert pairs[-1][1] + groups[-1].rows * groups[-1].bits // 32 == qrows
    assert parse_q_groups(qg, k) == groups


def test_q_groups_11008_counts():
    groups = qp((8, 32, 0.05), (4, 128, 0.1), (3, 128, 0.85)).groups(11008)
    assert [sum(1 for g in groups if g.bits == b) for b in (8, 4, 3)] == [18, 9, 73]
    assert groups[-1] == Group(3, 64)


@pytest.mark.parametrize("pairs,k,message", [
    ([4, 0, 7, 4], 64, "group 1 has 7 bits"),
    ([3, 0, 4, 3], 64, "must not increase"),
    ([4, 2], 64, "starts at packed row 2"),
    ([4, 0, 4, 2], 64, "not a whole number of 32-row blocks"),
    ([4, 0, 4, 4, 4, 8], 64, "leaving 0 of K = 64"),
    ([4, 0, 4, 4], 36, "leaving 4 of K = 36"),  # 4 rows of 4 bits do not fill a word
    ([4, 0, 4], 64, "pairs"),
])
def test_parse_q_groups_refuses_bad_layouts(pairs, k, message):
    with pytest.raises(FormatError, match=message) as e:
        parse_q_groups(torch.tensor(pairs, dtype=torch.int16), k, "model.layers.3.mlp.down_proj.q_groups")
    assert str(e.value).startswith("model.layers.3.mlp.down_proj.q_groups: ")


def test_parse_q_groups_short_last_group():
    # The last group takes what is left: 64 rows of a 128-row 3-bit layout.
    qg = torch.tensor([4, 0, 3, 16], dtype=torch.int16)
    assert parse_q_groups(qg, 192) == [Group(4, 128), Group(3, 64)]


# -- fp16 arithmetic ---------------------------------------------------------------------------------


def fp16_oracle_scale(qs: np.ndarray, qsm: np.ndarray) -> np.ndarray:
    """Each step rounded once to fp16 from an exact float64 value."""
    m = (qsm.astype(np.float64) / 256).astype(np.float16)
    return ((qs.astype(np.float64) ** 2).astype(np.float16).astype(np.float64)
            * m.astype(np.float64)[:, None]).astype(np.float16)


def test_dequant_scale_is_correctly_rounded_fp16_including_subnormals():
    gen = torch.Generator().manual_seed(11)
    # q_scale_max over many magnitudes: below 2^-6 the /256 lands in fp16 subnormals and loses bits.
    qsm = (torch.rand(4000, generator=gen, dtype=torch.float64) * 16 - 12).exp2().to(torch.float16)
    qs = torch.arange(1, 17).repeat(4000, 1)
    got = dequant_scale(qs, qsm)
    assert got.dtype == torch.float16
    want = fp16_oracle_scale(qs.numpy(), qsm.numpy())
    assert np.array_equal(got.numpy().view(np.uint16), want.view(np.uint16))
    # A hand case: 0.001 / 256 is subnormal, so the scale is not fp16(qs^2 * 0.001 / 256).
    sub = dequant_scale(torch.tensor([[3]]), torch.tensor([0.001], dtype=torch.float16))
    exact = np.float16(9 * float(np.float16(0.001)) / 256)
    assert float(sub) == float(np.float16(9 * float(np.float16(float(np.float16(0.001)) / 256))))
    assert float(sub) != float(exact)


@pytest.mark.parametrize("bits", WIDTHS)
def test_dequant_codes_matches_fp16_oracle(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.arange(1 << bits).repeat(64, 1)
    scale = (torch.rand(64, 1, generator=gen, dtype=torch.float64) * 20 - 16).exp2().to(torch.float16)
    got = dequant_codes(codes, bits, scale)
    want = ((codes.numpy() - (1 << (bits - 1))).astype(np.float64) * scale.numpy().astype(np.float64)).astype(np.float16)
    assert np.array_equal(got.numpy().view(np.uint16), want.view(np.uint16))
    rows_bits = torch.full((64, 1), bits)
    assert torch.equal(dequant_codes(codes, rows_bits, scale), got)


# -- one linear --------------------------------------------------------------------------------------


def make_linear(layout: QParams, k: int, n: int, seed: int, bias: bool = False):
    gen = torch.Generator().manual_seed(seed)
    groups = layout.groups(k)
    codes = random_codes(groups, n, gen)
    qs = torch.randint(1, 17, (len(groups), n), generator=gen)
    qsm = (torch.rand(len(groups), generator=gen) * 0.05 + 0.001).to(torch.float16)
    perm = torch.randperm(k, generator=gen)
    invperm = torch.argsort(perm)
    b = torch.randn(n, generator=gen).to(torch.float16) if bias else None
    return groups, codes, qs, qsm, perm, invperm, b


@pytest.mark.parametrize("layout", [
    qp((8, 32, 0.05), (6, 32, 0.1), (5, 32, 0.85)), qp((3, 64, 0.05), (2, 64, 0.95)), HEAD_OPTIONS[6],
], ids=lambda q: q.desc)
@pytest.mark.parametrize("slice_bytes", [32 << 20, 1], ids=["whole", "unit-slices"])
def test_pack_linear_then_decode_equals_direct_dequant(layout, slice_bytes, monkeypatch):
    """decode_linear works a slice of packing units at a time (one unit per slice at the
    smallest): the same values as a direct dequantization of the whole."""
    import exl2conv.pack as pack

    monkeypatch.setattr(pack, "_DECODE_BYTES", slice_bytes)
    k, n = 320, 96
    groups, codes, qs, qsm, perm, invperm, bias = make_linear(layout, k, n, seed=5, bias=True)
    t = pack_linear(codes, qs, qsm, groups, invperm, bias)
    assert list(t) == ["q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"]
    assert [t[x].dtype for x in t] == [torch.int32, torch.int32, torch.float16, torch.int16, torch.int32, torch.float16]
    assert tuple(t["q_scale"].shape) == (len(groups), n // 8) and tuple(t["q_groups"].shape) == (2 * len(groups),)

    # Direct: group by group in permuted order, then row perm[i] of the original takes permuted row i.
    w_perm = torch.empty((k, n), dtype=torch.float16)
    row = 0
    for gi, g in enumerate(groups):
        scale = dequant_scale(qs[gi:gi + 1], qsm[gi:gi + 1])[0]
        w_perm[row:row + g.rows] = dequant_codes(codes[row:row + g.rows], g.bits, scale)
        row += g.rows
    want = torch.empty_like(w_perm)
    want[perm] = w_perm
    got = decode_linear(t, "x")
    assert got.dtype == torch.float16 and torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert decoded_bits(t) == layout.total_bits(k, n, bias=True)
    t.pop("bias")
    assert decoded_bits(t) == layout.total_bits(k, n)
    # int16 invperm (the loader's own form) decodes the same.
    t["q_invperm"] = t["q_invperm"].to(torch.int16)
    assert torch.equal(decode_linear(t).view(torch.int16), want.view(torch.int16))


def test_decode_names_the_bad_tensor():
    groups, codes, qs, qsm, perm, invperm, _ = make_linear(qp((4, 32, 1)), 96, 64, seed=1)
    good = pack_linear(codes, qs, qsm, groups, invperm)
    name = "model.layers.3.mlp.down_proj"

    def fails(change: dict, message: str):
        t = dict(good) | change
        t = {k: v for k, v in t.items() if v is not None}
        with pytest.raises(FormatError) as e:
            decode_linear(t, name)
        assert str(e.value) == message or str(e.value).startswith(message)

    fails({"q_scale": good["q_scale"].to(torch.float16)},
          f"{name}.q_scale: expected int32 [G, N/8] = [3, 8], got float16 [3, 8]")
    fails({"q_scale": good["q_scale"][:2]}, f"{name}.q_scale: expected int32 [G, N/8] = [3, 8], got int32 [2, 8]")
    fails({"q_scale_max": good["q_scale_max"].float()}, f"{name}.q_scale_max: expected float16 [G] = [3]")
    fails({"q_weight": good["q_weight"][:8]}, f"{name}.q_weight: expected int32 [sum rows*bits/32, N] = [12, 64]")
    fails({"q_weight": good["q_weight"][:, :48]}, f"{name}.q_weight: expected int32 [packed rows, N] with N")
    fails({"q_groups": good["q_groups"].to(torch.int32)}, f"{name}.q_groups: expected int16 [2G]")
    fails({"q_invperm": good["q_invperm"].float()}, f"{name}.q_invperm: expected int32 or int16 [K]")
    fails({"q_invperm": torch.zeros(96, dtype=torch.int32)}, f"{name}.q_invperm: not a permutation of 0..95")
    fails({"q_invperm": None}, f"{name}.q_invperm: missing")
    fails({"bias": torch.zeros(60, dtype=torch.float16)}, f"{name}.bias: expected float16 [N] = [64]")
    fails({"q_scale_max": torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float16)},
          f"{name}.q_scale_max: holds inf or NaN")


def test_find_linears():
    names = ["model.layers.10.mlp.up_proj.q_weight", "model.layers.10.mlp.up_proj.q_scale",
             "model.layers.2.self_attn.q_proj.q_weight", "model.norm.weight", "lm_head.q_weight",
             "model.embed_tokens.weight"]
    assert find_linears(names) == ["lm_head", "model.layers.2.self_attn.q_proj", "model.layers.10.mlp.up_proj"]


@pytest.mark.gpu
def test_decode_on_cuda_matches_cpu():
    groups, codes, qs, qsm, perm, invperm, _ = make_linear(HEAD_OPTIONS[6], 1024, 512, seed=2)
    t = pack_linear(codes.cuda(), qs.cuda(), qsm.cuda(), groups, invperm.cuda())
    cpu = pack_linear(codes, qs, qsm, groups, invperm)
    assert all(torch.equal(t[x].cpu(), cpu[x]) for x in cpu)
    assert torch.equal(decode_linear(t).cpu().view(torch.int16), decode_linear(cpu).view(torch.int16))


# -- ExLlamaV2's own output --------------------------------------------------------------------------

TENSORS = "exllamav2-0.3.2_q4.0_tensors.safetensors"
JOB = "exllamav2-0.3.2_q4.0_job.json"


@pytest.fixture(scope="module")
def exl2_linears(fixture_dir):
    with safe_open(str(fixture_dir / TENSORS), framework="pt") as f:
        names = find_linears(f.keys())
        return {n: {k: f.get_tensor(f"{n}.{k}") for k in QUANT_KEYS if f"{n}.{k}" in f.keys()} for n in names}


@pytest.fixture(scope="module")
def exl2_job(fixture_dir):
    return json.loads((fixture_dir / JOB).read_text())


def chosen_qparams(job: dict, name: str) -> QParams:
    if name == "lm_head":
        return HEAD_OPTIONS[job["head_bits"]]
    module, linear = name.rsplit(".", 1)
    return QParams.from_dict(job["strategy"][module][linear])


def test_fixture_layouts_and_repack_bit_for_bit(exl2_linears, exl2_job):
    assert len(exl2_linears) == 211
    assert exl2_job["head_bits"] == 6
    module_bits: dict[str, int] = {}
    for name, t in exl2_linears.items():
        info = check_linear(t, name)
        chosen = chosen_qparams(exl2_job, name)
        assert info.groups == chosen.groups(info.k), name
        assert describe_groups(info.groups, info.k) == describe_groups(chosen.groups(info.k), info.k), name
        assert decoded_bits(t, name) == chosen.total_bits(info.k, info.n), name
        module_bits[name.rsplit(".", 1)[0]] = module_bits.get(name.rsplit(".", 1)[0], 0) + decoded_bits(t, name)

        codes = unpack_qweight(t["q_weight"], info.groups, info.k)
        qs = unpack_qscale(t["q_scale"])
        again = pack_linear(codes, qs, t["q_scale_max"], parse_q_groups(t["q_groups"], info.k), t["q_invperm"])
        assert sorted(again) == sorted(t), name
        for key in t:
            assert again[key].dtype == t[key].dtype and again[key].shape == t[key].shape, f"{name}.{key}"
            assert torch.equal(again[key], t[key]), f"{name}.{key}"
    # Our bit count per module equals what ExLlamaV2's optimizer recorded for its choice.
    for module, entry in exl2_job["strategy"].items():
        assert module_bits[module] == entry["total_bits"], module


def test_fixture_decoded_weights_look_like_weights(exl2_linears):
    for name, t in exl2_linears.items():
        wt = decode_linear(t, name)
        k = t["q_invperm"].numel()
        assert wt.dtype == torch.float16 and tuple(wt.shape) == (k, t["q_weight"].shape[1])
        wt = wt.float()
        assert bool(torch.isfinite(wt).all()), name
        std, mean = torch.std_mean(wt)
        assert 1e-3 < float(std) < 1.0, name
        # Real weights are centred near 0 (the zero point decodes to exactly 0).
        assert abs(float(mean)) < 0.1 * float(std), name
        assert float(wt.abs().max()) < 100.0, name
        per_output = wt.std(dim=0)  # one value per output feature (HF row)
        assert float(per_output.min()) > 1e-3 and float(per_output.max()) < 4.0, name


def test_mlp_bias_in_runtime_order_is_what_exllamav2_adds_where_it_belongs():
    """ExLlamaV2 reorders an MLP's up/gate output columns by down_proj's q_perm (ext_stloader.cpp
    tensor_remap: new column c = old column q_perm[c]) and adds the bias as stored: a bias stored
    in runtime order lands on its own column; stored as is, it lands elsewhere."""
    from exl2conv.pack import mlp_bias_from_runtime_order, mlp_bias_to_runtime_order

    g = torch.Generator().manual_seed(0)
    k, padded = 40, 64
    y = torch.randn(3, padded, generator=g)            # x @ W_up^T, the model's column order
    b = torch.randn(padded, generator=g)
    invperm = torch.randperm(k, generator=g).to(torch.int16)
    q_perm = torch.argsort(invperm.long())

    def runtime(stored):  # columns remapped, bias added as stored; back to model order for comparing
        out = y[:, :k][:, q_perm] + stored[:k]
        return out[:, invperm.long()]

    want = y[:, :k] + b[:k]
    stored = mlp_bias_to_runtime_order(b, invperm)
    assert torch.allclose(runtime(stored), want)
    assert not torch.allclose(runtime(b), want)
    assert torch.equal(stored[k:], b[k:])
    assert torch.equal(mlp_bias_from_runtime_order(stored, invperm), b)
