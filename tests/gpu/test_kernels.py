"""Parity of every CUDA kernel with its torch reference (exl2conv.ops.REGISTRY; run on the device machine)."""

import time

import pytest
import torch

from exl2conv import gptq, kernels, ops
from exl2conv.qparams import ATTN_OPTIONS, HEAD_OPTIONS, MLP_OPTIONS, distinct_columns, qp
from tests.opcases import CASES

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    t0 = time.monotonic()
    mod = kernels.get()
    print(f"\nextension ready in {time.monotonic() - t0:.1f} s")
    assert mod is not None, "the CUDA extension did not build"
    return mod


@pytest.fixture
def fused(monkeypatch):
    """The fused kernels on (on unless EXL2CONV_FUSED_KERNELS=0), whatever the environment."""
    monkeypatch.setenv("EXL2CONV_FUSED_KERNELS", "1")


@pytest.mark.parametrize("name", kernels.OPS)
def test_every_kernel_matches_its_named_reference(ext, fused, name):
    """Each kernel of the extension (kernels.OPS), through the operation that picks it, against its
    named torch reference on the same inputs (tests/opcases.py): a kernel without a reference in
    ops.REGISTRY, or without a case, fails here."""
    assert name in ops.REGISTRY, f"{name}: no torch reference in exl2conv.ops.REGISTRY"
    assert name in CASES, f"{name}: no parity case in tests/opcases.py"
    op, case = ops.REGISTRY[name], CASES[name]
    assert ops.kernel(name, torch.zeros(1, device="cuda")) is not None
    args = case.make("cuda")
    got = case.outputs(op.dispatch(*args), args)
    args = case.make("cuda")
    want = case.outputs(op.reference(*args), args)
    case.check(got, want)


def problem(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, k, generator=g) * torch.linspace(0.1, 3, k)
    h = (x.T @ x / 1024).cuda()
    wt = (torch.randn(k, n, generator=g) * 0.02).cuda()
    return wt, h


def one_group(ext, x, cand, grid, bits):
    """The p-grid partial sums ``[P, blocks]`` of one group ``x`` ``[rows, N]``: a batch of one."""
    i32 = dict(dtype=torch.int32, device="cuda")
    return ext.pgrid_err_many(x.unsqueeze(0).contiguous(), torch.tensor([0], **i32),
                              torch.tensor([x.shape[0]], **i32), torch.tensor([bits], **i32),
                              cand.view(1, -1).contiguous(), grid, 0)[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pgrid_kernel_matches_torch(ext, bits):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(128, 4096, generator=g) * 0.03).cuda()
    amax = x.abs().amax(0) + 1e-12
    base = amax / (((1 << bits) - 1) / 2)
    qs = torch.clamp(torch.round(16 * torch.sqrt(base / base.max())), 1, 16)
    cand = (qs / 16) ** 2 * base.max()
    grid = gptq.P_GRID.to("cuda", torch.float32)
    ref = ops.pgrid_errors(x, cand, grid, 1 << (bits - 1), (1 << bits) - 1)
    got = one_group(ext, x, cand, grid, bits).sum(1)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=0)
    assert int(torch.argmin(got)) == int(torch.argmin(ref))


def test_pgrid_many_kernel_equals_one_group_at_a_time(ext):
    """The batched search gives, bit for bit, each group's sums as a batch of one gives them."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(3, 512, 1000, generator=g) * 0.03).cuda()  # N not a multiple of the block
    cidx, rows, bits = [2, 0, 1], [32, 256, 128], [3, 8, 5]
    grid = gptq.P_GRID.to("cuda", torch.float32)
    cand = (w[:, :32].abs().amax(1) / 3)[cidx].contiguous()
    i32 = dict(dtype=torch.int32, device="cuda")
    many = ext.pgrid_err_many(w, torch.tensor(cidx, **i32), torch.tensor(rows, **i32), torch.tensor(bits, **i32),
                              cand, grid, 64)
    for i, (c, r, b) in enumerate(zip(cidx, rows, bits)):
        one = one_group(ext, w[c, 64:64 + r].contiguous(), cand[i].contiguous(), grid, b)
        assert torch.equal(many[i], one), (c, r, b)
    # and the torch path of find_params_many agrees on the chosen scales
    fast = gptq.find_params_many(w, cidx, 64, rows, bits)
    slow = gptq.find_params_many(w.cpu(), cidx, 64, rows, bits)
    assert torch.equal(fast[0].cpu(), slow[0])
    assert (fast[1].cpu() == slow[1]).float().mean() >= 2 / 3


def test_refine_qs_kernel_matches_torch(ext):
    """The scale-index refinement kernel chooses what the torch reference chooses (but where the
    two error sums, added in another order, tie within float32 rounding), for a batch of groups of
    different lengths, bit widths and start rows."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(3, 512, 1000, generator=g) * torch.linspace(0.005, 0.05, 1000)).cuda()
    w[:, 70, ::9] *= 8  # outliers, so that some columns move
    cidx, rows, bits = [2, 0, 1], [32, 256, 128], [3, 8, 5]
    rw = (torch.rand(256, generator=g) + 0.1).cuda()
    a = 64
    qs, qmax, _ = gptq.find_params_many(w.cpu(), cidx, a, rows, bits, torch.zeros(256))  # unrefined
    qs, qmax = qs.cuda(), qmax.cuda()
    i32 = dict(dtype=torch.int32, device="cuda")
    got = ext.refine_qs_many(w, torch.tensor(cidx, **i32), torch.tensor(rows, **i32), torch.tensor(bits, **i32),
                             qs, qmax, rw, a)
    x = torch.stack([torch.nn.functional.pad(w[c, a:a + r], (0, 0, 0, 256 - r)) for c, r in zip(cidx, rows)])
    ref = ops.refine_qs(x, qs, qmax, bits, rw)
    assert (got != qs).float().mean() > 0.01  # the refinement did move columns
    assert (got != ref).float().mean() < 1e-3
    assert (got - qs).abs().max() <= 1


@pytest.mark.parametrize("table", ["attn", "mlp", "head"])
def test_gptq_kernel_codes_match_torch(ext, table, monkeypatch):
    k, n = 512, 384
    wt, h = problem(k, n, seed=len(table))
    prep = gptq.prepare(h)
    if table == "head":
        cands = list(HEAD_OPTIONS.values())
    else:
        cols = distinct_columns(ATTN_OPTIONS if table == "attn" else MLP_OPTIONS)[0]
        cands = cols[-1]
    fast = gptq.quantize_many(wt, prep, cands)
    monkeypatch.setitem(kernels._state, "mod", None)  # force the torch path
    ref = gptq.quantize_many(wt, prep, cands)
    for a, b in zip(fast, ref):
        same = (a.codes == b.codes).float().mean().item()
        assert same > 0.9999, (a.qparams.desc, same)
        assert torch.equal(a.qs, b.qs) or (a.qs != b.qs).float().mean() < 1e-3
        rel = ((a.weight - b.weight).norm() / b.weight.norm()).item()
        assert rel < 1e-4, (a.qparams.desc, rel)


def test_a_built_extension_loads_without_cpp_extension(ext):
    """Once built, the library is stamped with what it was built from, and the next process loads
    it directly (no setuptools import, no ninja run)."""
    import os
    import subprocess
    import sys

    arch = os.environ["TORCH_CUDA_ARCH_LIST"]
    assert (kernels.cache_dir() / "sources.sha256").read_text() == kernels.stamp(arch)
    code = ("import sys; from exl2conv import kernels; m = kernels.get(); "
            "print(m is not None, 'torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=kernels.CSRC.parent).stdout.split()
    assert out == ["True", "False"], out


def test_coded_codes_in_pinned_host_memory_decode_the_same():
    """The measurement of a large model keeps its candidates' codes in pinned host memory
    (Coded.to_host): decoding copies them back and gives the same weight."""
    from exl2conv.coded import Coded

    g = torch.Generator(device="cuda").manual_seed(1)
    k, n = 256, 96
    x = torch.randn(512, k, device="cuda", generator=g)
    prep = gptq.prepare(x.T @ x / 512)
    wt = torch.randn(k, n, device="cuda", generator=g) * 0.05
    res = gptq.quantize(wt, prep, qp((4, 32, 0.2), (3, 64, 0.8)))
    coded = Coded.of(res, 90, prep.invperm)
    host = coded.to_host()
    assert host.codes.device.type == "cpu" and host.codes.is_pinned()
    assert torch.equal(host.decode(), coded.decode())
    assert torch.equal(coded.decode().float(), res.weight[:, :90].T)


def test_codes_in_a_host_arena_are_page_locked_and_decode_the_same():
    """The measurement's candidates' codes go into one page-locked buffer (memory.HostArena,
    registered with cudaHostRegister): copies into it are exact, page-locked (so the copies back to
    the GPU run asynchronously), and the buffer is reused after a reset."""
    from exl2conv.coded import Coded
    from exl2conv.memory import HostArena

    g = torch.Generator(device="cuda").manual_seed(2)
    k, n = 256, 96
    x = torch.randn(512, k, device="cuda", generator=g)
    prep = gptq.prepare(x.T @ x / 512)
    coded = []
    for seed in range(3):
        wt = torch.randn(k, n, device="cuda", generator=g) * 0.05 * (seed + 1)
        coded.append(Coded.of(gptq.quantize(wt, prep, qp((4, 32, 0.2), (3, 64, 0.8))), 90, prep.invperm))
    arena = HostArena(HostArena.size_for([k * n] * 2))
    assert arena.registered and arena.pinned
    host = [c.to_host(arena) for c in coded]  # the third is past the buffer: a block of its own
    assert host[0].codes.data_ptr() == arena.buf.data_ptr()
    assert host[2].codes.data_ptr() != arena.buf.data_ptr() + 2 * k * n
    for h, c in zip(host, coded):
        assert h.codes.is_pinned()
        assert torch.equal(h.decode(), c.decode())
    arena.reset()
    again = coded[2].to_host(arena)
    assert again.codes.data_ptr() == arena.buf.data_ptr()
    assert torch.equal(again.decode(), coded[2].decode())
    arena.close()
    assert torch.equal(again.codes.to("cuda"), coded[2].codes)  # still readable once unpinned


def _coded_problem(k, n, out, seed):
    """A quantized weight as :class:`coded.Coded` with groups of 2..8 bits, and its result."""
    from exl2conv.coded import Coded

    wt, h = problem(k, n, seed)
    prep = gptq.prepare(h)
    res = gptq.quantize(wt, prep, qp((8, 32, 0.5), (4, 64, 0.4), (2, 32, 0.1)))
    return res, prep, Coded.of(res, out, prep.invperm)


def test_codes_of_kernel_matches_torch(ext, fused, monkeypatch):
    """Coded.of's kernel (codes_of) gives the codes of its torch loop, and they decode to GPTQ's values."""
    from exl2conv.coded import Coded

    res, prep, coded = _coded_problem(256, 160, 150, 5)
    monkeypatch.setenv("EXL2CONV_FUSED_KERNELS", "0")
    ref = Coded.of(res, 150, prep.invperm)
    monkeypatch.undo()
    assert torch.equal(coded.codes, ref.codes)
    assert torch.equal(coded.decode().float(), res.weight[:, :150].T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_coded_delta_kernel_matches_torch(ext, fused, dtype):
    """Coded.delta (coded_delta) equals the scorer's torch expression bit for bit and with its
    strides, codes on the device or copied in from pinned host memory; out and K off the 32-tiles."""
    res, prep, coded = _coded_problem(288, 96, 90, 6)
    base = (res.weight[:, :90].T + torch.randn(90, 288, device="cuda") * 1e-3).to(dtype).contiguous()
    dense = coded.decode()
    want = (torch.sub(dense, base) if dtype == torch.float32 else dense.to(torch.float32).sub_(base)).to(torch.bfloat16)
    got = coded.delta(base)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)
    host = coded.to_host()
    assert torch.equal(host.delta(base), want)
    assert torch.equal(host.delta(base, host.codes.to("cuda")), want)


@pytest.mark.parametrize("spread", [False, True])
def test_fused_scale_search_matches_the_unfused_path(ext, fused, monkeypatch, spread):
    """find_params_many with the fused kernels (params_start, p-grid, params_finish) gives the qs,
    qscale_max and scales of the unfused path (torch operations around the pgrid and refine
    kernels), bit for bit: groups of one and of several sizes (rows past a group's end ignored),
    bit widths 2..8, candidate rows written where ``out_idx`` says."""
    g = torch.Generator(device="cuda").manual_seed(7)
    c, k, n = 6, 256, 200
    w = torch.randn(c, k, n, device="cuda", generator=g) * torch.linspace(0.01, 2, n, device="cuda")
    w[1, 64:96, 5] = 0  # an all-zero column in a group
    rw = torch.rand(k, device="cuda", generator=g) + 0.5
    cases = [([0, 2, 3], 32, [32, 64, 32], [4, 3, 8]), ([1, 4, 5], 64, [32, 32, 32], [2, 5, 6]),
             ([5], 96, [128], [4])]
    for cidx, a, rows, bits in cases:
        out_idx = list(cidx)
        if spread:  # the groups' rows taken from a packed copy, as _gptq_pass does past a span
            x = torch.stack([w[ci, a:a + max(rows)] for ci in cidx]).contiguous()
            src, src_idx, start = x, list(range(len(cidx))), 0
        else:
            src, src_idx, start = w, cidx, a
        monkeypatch.setenv("EXL2CONV_FUSED_KERNELS", "0")  # the unfused path
        want_qs, want_qmax, want_scale = gptq.find_params_many(src, src_idx, start, rows, bits, rw[a:])
        monkeypatch.setenv("EXL2CONV_FUSED_KERNELS", "1")
        scale = torch.full((c, n), -1.0, device="cuda")
        qs, qmax, none = gptq.find_params_many(src, src_idx, start, rows, bits, rw[a:], scale_out=scale,
                                               out_idx=out_idx if spread else None)
        assert none is None
        assert torch.equal(qs, want_qs) and torch.equal(qmax, want_qmax)
        assert torch.equal(scale[cidx], want_scale)
        others = [i for i in range(c) if i not in cidx]
        assert (scale[others] == -1).all()


@pytest.mark.parametrize("table", ["attn", "mlp", "head"])
def test_gptq_passes_with_and_without_the_fused_scale_search_agree_exactly(ext, fused, table, monkeypatch):
    k, n = 512, 384
    wt, h = problem(k, n, seed=10 + len(table))
    prep = gptq.prepare(h)
    if table == "head":
        cands = list(HEAD_OPTIONS.values())
    else:
        cands = distinct_columns(ATTN_OPTIONS if table == "attn" else MLP_OPTIONS)[0][-1]
    kernels_on = gptq.quantize_many(wt, prep, cands, max_bytes=k * n * 6 * 3)  # passes of 3: groups past spans too
    monkeypatch.setenv("EXL2CONV_FUSED_KERNELS", "0")
    plain = gptq.quantize_many(wt, prep, cands, max_bytes=k * n * 6 * 3)
    for a, b in zip(kernels_on, plain):
        assert torch.equal(a.codes, b.codes), a.qparams.desc
        assert torch.equal(a.qs, b.qs) and torch.equal(a.qscale_max, b.qscale_max), a.qparams.desc
        assert torch.equal(a.q, b.q), a.qparams.desc


def test_fused_kernels_leave_the_conversion_unchanged(ext, tmp_path, monkeypatch):
    """A tiny model's measurement.json and output files with the fused kernels (the scale search,
    codes_of, coded_delta) are the bytes of the torch paths they replace."""
    from exl2conv.cli import main
    from tests.gpu.test_determinism import digest
    from tests.tinymodel import make_tiny_llama

    src = make_tiny_llama(tmp_path / "m", seed=4, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
    outs = []
    for fused in (True, False):
        monkeypatch.setenv("EXL2CONV_FUSED_KERNELS", str(int(fused)))
        run = f"f{int(fused)}"
        out = tmp_path / run / "out"
        rc = main(["-i", str(src), "-o", str(tmp_path / run / "w"), "-cf", str(out), "-b", "4.0",
                   "-l", "256", "-ml", "256", "--device", "cuda"])
        assert rc == 0
        outs.append((digest(out), (tmp_path / run / "w" / "measurement.json").read_text()))
    assert outs[0] == outs[1]
