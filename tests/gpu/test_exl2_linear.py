"""The EXL2 linear's CUDA kernels (csrc/exl2_linear.cu) against the decoder, on the device:
exl2_dequant bit for bit, exl2_gemv within its stated bound (tests/opcases.py, gemv_bound), over
mixed bit widths, group sizes, partial chunks, padded widths and model-sized shapes; and
Exl2Linear's CUDA paths against its torch path. The registry's parity test
(tests/gpu/test_kernels.py) runs the two operations on the GPTQ-made case too."""

import inspect
import time

import pytest
import torch

from exl2conv import kernels, ops
from exl2conv.pack import decode_linear
from exl2conv.qparams import Group, qp
from exl2conv.runtime.linear import Exl2Linear
from tests.opcases import exl2_linear, exl2_on, gemv_bound, gemv_check, hand_packed

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    mod = kernels.get()
    assert mod is not None, "the CUDA extension did not build"
    return mod


def _layout(parts, k):
    return qp(*parts).groups(k)


# name -> the packed tensors on the CPU, built once per session (down_11008: a Llama-2-7B down_proj)
SHAPES = {
    "gptq_mixed": lambda: exl2_linear(),
    # the last group's 16 rows are half a chunk
    "partial_chunk": lambda: hand_packed(80, 64, [Group(6, 32), Group(3, 32), Group(2, 16)], 1),
    # two chunks: one K split, the kernel writes fp16 directly
    "one_split": lambda: hand_packed(64, 96, _layout(((4, 32, 1),), 64), 2),
    "attn_4096": lambda: hand_packed(4096, 4096, _layout(((4, 128, 0.1), (3, 128, 0.9)), 4096), 3),
    "down_11008": lambda: hand_packed(11008, 4096, _layout(((5, 64, 0.25), (4, 64, 0.75)), 11008), 4),
    "up_4096x11008": lambda: hand_packed(4096, 11008, _layout(((8, 32, 0.05), (6, 32, 0.1), (2, 32, 0.85)), 4096), 5),
    # the default head layout (-hb 6: 15 % 8-bit + 85 % 6-bit, groups of 128), a 32000-token vocabulary
    "head_6bit": lambda: hand_packed(2048, 32000, _layout(((8, 128, 0.15), (6, 128, 0.85)), 2048), 6),
}


_cache: dict = {}


def packed(name: str) -> dict:
    if name not in _cache:
        _cache[name] = exl2_on("cuda", SHAPES[name]())
    return _cache[name]


@pytest.mark.parametrize("name", SHAPES)
def test_dequant_is_the_decoder_bit_for_bit(ext, name):
    t = packed(name)
    got = ext.exl2_dequant(t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_perm"], t["q_map"])
    assert torch.equal(got, decode_linear({k: t[k] for k in ("q_weight", "q_scale", "q_scale_max", "q_groups",
                                                             "q_invperm")}))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("name", SHAPES)
def test_gemv_is_within_its_bound(ext, name, rows):
    t = packed(name)
    k = t["q_perm"].numel()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).half().cuda()
    got = ext.exl2_gemv(x, t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_perm"], t["q_map"])
    want = ops.exl2_gemv_ref(x, t)
    gemv_check((got, gemv_bound(x, t)), (want, None))
    # deterministic: the split sums are added in a fixed order
    again = ext.exl2_gemv(x, t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_perm"], t["q_map"])
    assert torch.equal(got, again)


def test_gemv_split_counters_per_stream(ext):
    """The split-K counters are kept per stream and left at zero: alternating streams and widths
    (a wider linear after a narrower one grows nothing it should not) gives the same bits."""
    results = {}
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            for name in ("attn_4096", "head_6bit", "down_11008"):
                t = packed(name)
                x = torch.ones(2, t["q_perm"].numel(), device="cuda", dtype=torch.float16)
                y = ext.exl2_gemv(x, t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_perm"], t["q_map"])
                stream.synchronize()
                assert torch.equal(results.setdefault(name, y), y), name


def test_gemv_of_a_strided_batch(ext):
    """x as a non-contiguous view goes through ops.exl2_gemv (made contiguous there)."""
    t = packed("gptq_mixed")
    k = t["q_perm"].numel()
    x = torch.randn(3, 2 * k, generator=torch.Generator().manual_seed(1)).half().cuda()[:, ::2]
    gemv_check((ops.exl2_gemv(x, t), gemv_bound(x, t)), (ops.exl2_gemv_ref(x, t), None))


@pytest.mark.parametrize("rows", [1, 8, 9, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_exl2_linear_cuda_paths_match_its_torch_path(ext, rows, bias, monkeypatch):
    """Exl2Linear on CUDA (gemv up to 8 rows, dequant + matmul above) against the same module on the
    CPU (decode_linear, float32 product rounded once), with out_features padded to N."""
    src = exl2_linear()
    t = {key: src[key] for key in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")}
    out = 150
    if bias:
        t["bias"] = torch.randn(160, generator=torch.Generator().manual_seed(2)).half()
    cpu = Exl2Linear(t, out, "lin")
    gpu = Exl2Linear(t, out, "lin").cuda()
    x = torch.randn(1, rows, 544, generator=torch.Generator().manual_seed(rows)).half()
    want = cpu(x)
    _no_torch_path(monkeypatch)
    got = gpu(x.cuda()).cpu()
    assert got.shape == want.shape == (1, rows, out)
    w = decode_linear(t).float()[:, :out]
    tol = (x.float().abs() @ w.abs()) * 2.0**-9 + want.float().abs() * 2.0**-9 + 1e-3
    assert bool(((got.float() - want.float()).abs() <= tol).all())


def _no_torch_path(monkeypatch):
    """From here on the EXL2 operations must run their kernels: their torch references raise."""
    def boom(*args, **kwargs):
        raise AssertionError("the torch reference ran where the kernel should have")

    monkeypatch.setattr(ops, "exl2_dequant_ref", boom)
    monkeypatch.setattr(ops, "exl2_gemv_ref", boom)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want.float()).norm() / want.float().norm()).item()


def test_a_model_on_the_kernels_follows_its_torch_path(ext, tmp_path, monkeypatch):
    """A 2-layer random Llama EXL2 folder (tests/randexl2.py; vocabulary 1000, padded to 1024
    columns): on the GPU in float16, prefill (12 rows: dequant + cuBLAS) and one decode step (1 row:
    gemv) give the logits the CPU's float32 torch path gives, within float16 arithmetic."""
    from exl2conv.runtime import Exl2ForCausalLM
    from tests.randexl2 import make_random_exl2

    folder = make_random_exl2(tmp_path / "m", hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=1000, layers=2)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    cpu = Exl2ForCausalLM.from_quantized(folder, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        want = cpu(input_ids=ids).logits
    gpu = Exl2ForCausalLM.from_quantized(folder, device="cuda", dtype=torch.float16)
    _no_torch_path(monkeypatch)
    with torch.inference_mode():
        assert _rel(gpu(input_ids=ids.cuda()).logits, want) < 1e-2
        first = gpu(input_ids=ids[:, :11].cuda(), use_cache=True)
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        name = "cache" if "cache" in inspect.signature(gpu.forward).parameters else "past_key_values"
        step = gpu(input_ids=ids[:, 11:].cuda(), use_cache=True, **{name: cache}).logits
    assert _rel(step[:, -1], want[:, -1]) < 1e-2


def test_decode_speed_against_cublas_fp16(ext):
    """Not a pass/fail of speed: prints the gemv's time per call on a 4096 x 4096 4/3-bit linear and
    a Llama-2-7B down_proj beside cuBLAS on the fp16 weight (the kernel reads ~4x fewer bytes)."""
    for name in ("attn_4096", "down_11008", "up_4096x11008"):
        t = packed(name)
        k = t["q_perm"].numel()
        w = ops.exl2_dequant(t)
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda").half()
            args = (x, t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_perm"], t["q_map"])
            us_q = _time(lambda: ext.exl2_gemv(*args))
            us_h = _time(lambda: x @ w)
            gb = t["q_weight"].numel() * 4 / 1e9
            print(f"\n{name} rows={rows}: exl2_gemv {us_q:.1f} us ({gb / us_q * 1e6:.0f} GB/s of q_weight), "
                  f"fp16 cuBLAS {us_h:.1f} us")


def _time(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6
