"""Inputs for every CUDA kernel's operation (exl2conv.ops.REGISTRY) on any device, and how close a
kernel's results must come to its reference's. tests/gpu/test_kernels.py runs each operation both
ways on a GPU; tests/unit/test_ops.py runs the references on the CPU, which checks these inputs."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from exl2conv import gptq, ops
from exl2conv.coded import Coded
from exl2conv.pack import chunk_map, dequant_scale, pack_linear, q_perm
from exl2conv.qparams import Group, qp

# one group of each of three candidates of a [3, 256, 200] weight: lengths, widths and a start row
# off the first block; N = 200 is not a multiple of the kernels' column tiles
C, K, N = 3, 256, 200
CIDX, ROWS, BITS, A = [2, 0, 1], [32, 64, 32], [4, 3, 8], 32


@dataclass(frozen=True)
class Case:
    """make(device): fresh arguments (ops that write into their arguments get their own);
    outputs(returned, args): the tensors to compare; check(got, want): the kernel's (got) against
    the reference's (want)."""

    make: Callable[[str], tuple]
    outputs: Callable[[object, tuple], tuple]
    check: Callable[[tuple, tuple], None]


def _weights(dev: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(C, K, N, generator=g) * torch.linspace(0.01, 2, N)
    w[1, 64:96, 5] = 0  # an all-zero column in a group
    w[:, 70, ::9] *= 8  # outliers, so that the refinement moves some columns
    return w.to(dev)


def _batch(dev: str, cidx: list[int] = CIDX) -> ops.GroupBatch:
    return ops.group_batch(torch.device(dev), cidx, ROWS, BITS, gptq.P_GRID)


def _row_weight(dev: str) -> torch.Tensor:
    return (torch.rand(K, generator=torch.Generator().manual_seed(8)) + 0.5).to(dev)


def _search(dev: str):
    """The weights, the batch and the reference's scale search up to each operation."""
    w, t = _weights(dev), _batch(dev)
    qs, cand, s_max = ops.params_start_ref(w, t, A)
    err = ops.pgrid_err_many_ref(w, t, cand, A)
    return w, t, qs, cand, s_max, err


def _exact(got: tuple, want: tuple) -> None:
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        assert torch.equal(g, w)


def _gptq_block_make(dev: str) -> tuple:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, K, generator=g) * torch.linspace(0.1, 3, K)
    u = gptq.prepare(x.T @ x / 512).u.to(dev)
    w = _weights(dev)
    bits = torch.tensor(BITS, dtype=torch.int32).view(-1, 1).expand(C, K)
    zero_rows = (1 << (bits - 1)).contiguous().to(dev)
    max_rows = ((1 << bits) - 1).contiguous().to(dev)
    qs = torch.randint(1, 17, (C, N), generator=g)
    scale = dequant_scale(qs, (w.abs().amax((1, 2)) / 100).cpu()).float().to(dev)
    codes = torch.zeros((C, K, N), dtype=torch.int16, device=dev)
    err_blk = torch.empty((C, ops.BLOCK, N), dtype=torch.float32, device=dev)
    return w, scale, zero_rows, max_rows, u, w, codes, err_blk, A  # q_out is w, as in a GPTQ pass


def _gptq_block_check(got: tuple, want: tuple) -> None:
    (wg, cg, eg), (ww, cw, ew) = got, want
    assert (cg == cw).float().mean().item() > 0.9999  # a value on a rounding boundary may tip
    assert ((wg - ww).norm() / ww.norm()).item() < 1e-4
    assert ((eg - ew).norm() / ew.norm()).item() < 1e-4


def _pgrid_check(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=0)  # sums in another order
    assert torch.equal(torch.argmin(got[0], 1), torch.argmin(want[0], 1))


def _pgrid_make(dev: str) -> tuple:
    w, t, qs, cand, s_max, err = _search(dev)
    return w, t, cand, A


def _refine_make(dev: str) -> tuple:
    w, t, qs, cand, s_max, err = _search(dev)
    qscale_max = (s_max * t.grid[torch.argmin(err, 1)]).to(torch.float16)
    return w, t, qs.to(torch.int64), qscale_max, _row_weight(dev), A


def _refine_check(got: tuple, want: tuple) -> None:
    assert (got[0] != want[0]).float().mean().item() < 1e-3  # ties within float32 rounding may go either way


def _finish_make(dev: str) -> tuple:
    w, t, qs, cand, s_max, err = _search(dev)
    scale_out = torch.full((C, N), -1.0, device=dev)
    return w, t, _batch(dev, [1, 2, 0]), err, qs, s_max, _row_weight(dev), scale_out, A


def _coded(dev: str, out: int = 150):
    g = torch.Generator().manual_seed(5)
    k, n = 256, 160
    x = torch.randn(512, k, generator=g) * torch.linspace(0.1, 3, k)
    prep = gptq.prepare(x.T @ x / 512)
    wt = torch.randn(k, n, generator=g) * 0.02
    res = gptq.quantize(wt.to(dev), prep, qp((8, 32, 0.5), (4, 64, 0.4), (2, 32, 0.1)))
    return res, Coded.of(res, out, prep.invperm.to(dev))


def _codes_of_make(dev: str) -> tuple:
    res, coded = _coded(dev)
    return res.q.contiguous(), coded.scale, coded.group, coded.zero, torch.empty_like(coded.codes)


def _coded_delta_make(dev: str) -> tuple:
    res, coded = _coded(dev)
    noise = torch.randn(150, 256, generator=torch.Generator().manual_seed(6)).to(dev) * 1e-3
    base = (res.weight[:, :150].T + noise).to(torch.bfloat16).contiguous()
    return coded.codes, coded.zero, coded.scale, coded.group, coded.invperm, base


# an EXL2 linear from exl2conv's own quantizer: all six bit widths in groups of 32, 64 and 128 rows,
# K = 544 (17 chunks of 32 rows), N = 160 (not a multiple of the kernels' 128-column tiles), a
# random act-order permutation. (GPTQ takes K in multiples of 32; the format's partial last chunk
# is checked on hand-packed codes, tests/gpu/test_exl2_linear.py.)
EXL2_PARTS = ((8, 32, 0.1), (6, 64, 0.1), (5, 128, 0.2), (4, 32, 0.2), (3, 64, 0.2), (2, 32, 0.2))


@functools.lru_cache(maxsize=None)
def exl2_linear(k: int = 544, n: int = 160, parts: tuple = EXL2_PARTS, seed: int = 9) -> dict[str, torch.Tensor]:
    """One linear's packed tensors (CPU) with q_perm and q_map, as Exl2Linear.packed gives them:
    GPTQ of a random weight ``[k, n]`` against a random Hessian, packed as the converter packs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g) * torch.linspace(0.1, 3, k)
    prep = gptq.prepare(x.T @ x / 512)
    res = gptq.quantize(torch.randn(k, n, generator=g) * 0.02, prep, qp(*parts))
    t = pack_linear(res.codes, res.qs, res.qscale_max, res.groups, res.invperm)
    return dict(t, q_perm=q_perm(t["q_invperm"]), q_map=chunk_map(res.groups))


def hand_packed(k: int, n: int, groups: list[Group], seed: int, scale_max: float = 0.01) -> dict[str, torch.Tensor]:
    """Random codes and scale indices packed by exl2conv's packer (CPU), with q_perm and q_map: layouts
    GPTQ does not produce (a partial last chunk) and model-sized ones without a GPTQ run."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.cat([torch.randint(0, 1 << gr.bits, (gr.rows, n), generator=g) for gr in groups])
    qs = torch.randint(1, 17, (len(groups), n), generator=g)
    t = pack_linear(codes, qs, torch.rand(len(groups), generator=g) * scale_max + scale_max / 10, groups,
                    torch.randperm(k, generator=g))
    return dict(t, q_perm=q_perm(t["q_invperm"]), q_map=chunk_map(groups))


def exl2_on(dev: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: v.to(dev) for key, v in t.items()}


def gemv_bound(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 ``[B, N]``: how far exl2_gemv may come from its reference, ``2^-10 * (|x| @ |W|)``:
    float32 sums of K products (K * 2^-24 relative each, well below 2^-11 here), each product of
    the unrounded ``(code - zero) * scale`` rather than the fp16 weight (2^-11 relative), and the
    two results' fp16 roundings (checked separately, one fp16 step)."""
    w = ops.exl2_dequant_ref(t).to(torch.float64)
    return (x.abs().to(torch.float64) @ w.abs() * 2.0**-10).to(torch.float32)


def gemv_check(got: tuple, want: tuple) -> None:
    (yg, bound), (yw, _) = got, want
    assert yg.dtype == yw.dtype == torch.float16 and yg.shape == yw.shape
    diff = (yg.float() - yw.float()).abs()
    allowed = bound + yw.float().abs() * 2.0**-10 + 2.0**-24  # + one fp16 step of the result
    assert bool((diff <= allowed).all()), f"max excess {(diff - allowed).max().item():.3g}"


def _gemv_make(dev: str, rows: int = 5) -> tuple:
    x = torch.randn(rows, 544, generator=torch.Generator().manual_seed(10)).half()
    return x.to(dev), exl2_on(dev, exl2_linear())


CASES: dict[str, Case] = {
    "gptq_block": Case(_gptq_block_make, lambda r, a: (a[0], a[6], a[7]), _gptq_block_check),
    "params_start": Case(lambda dev: (_weights(dev), _batch(dev), A), lambda r, a: tuple(r), _exact),
    "pgrid_err_many": Case(_pgrid_make, lambda r, a: (r,), _pgrid_check),
    "refine_qs_many": Case(_refine_make, lambda r, a: (r,), _refine_check),
    "params_finish": Case(_finish_make, lambda r, a: tuple(r) + (a[7],), _exact),
    "codes_of": Case(_codes_of_make, lambda r, a: (a[4],), _exact),
    "coded_delta": Case(_coded_delta_make, lambda r, a: (r,), _exact),
    "exl2_dequant": Case(lambda dev: (exl2_on(dev, exl2_linear()),), lambda r, a: (r,), _exact),
    "exl2_gemv": Case(_gemv_make, lambda r, a: (r, gemv_bound(*a)), gemv_check),
}
