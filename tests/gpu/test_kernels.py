"""Parity of every CUDA kernel with its torch reference (run on the device machine)."""

import os
import time

import pytest
import torch

from exl2conv import gptq, kernels
from exl2conv.qparams import ATTN_OPTIONS, HEAD_OPTIONS, MLP_OPTIONS, distinct_columns

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    t0 = time.monotonic()
    mod = kernels.get()
    print(f"\nextension ready in {time.monotonic() - t0:.1f} s")
    assert mod is not None, "the CUDA extension did not build"
    return mod


def problem(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, k, generator=g) * torch.linspace(0.1, 3, k)
    h = (x.T @ x / 1024).cuda()
    wt = (torch.randn(k, n, generator=g) * 0.02).cuda()
    return wt, h


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pgrid_kernel_matches_torch(ext, bits):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(128, 4096, generator=g) * 0.03).cuda()
    amax = x.abs().amax(0) + 1e-12
    base = amax / (((1 << bits) - 1) / 2)
    qs = torch.clamp(torch.round(16 * torch.sqrt(base / base.max())), 1, 16)
    cand = (qs / 16) ** 2 * base.max()
    grid = gptq.P_GRID.to("cuda", torch.float32)
    ref = gptq.pgrid_errors(x, cand, grid, 1 << (bits - 1), (1 << bits) - 1)
    got = ext.pgrid_err(x, cand, grid, bits)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=0)
    assert int(torch.argmin(got)) == int(torch.argmin(ref))


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
