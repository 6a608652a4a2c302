"""exl2conv.rounding: coordinate descent of a GPTQ result's codes on EXL2's grid."""

import itertools

import pytest
import torch

from exl2conv import gptq, rounding
from exl2conv.pack import dequant, dequant_scale
from exl2conv.qparams import qp


def _problem(k=64, n=32, rows=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.linspace(0.2, 3.0, k)
    x[:, 5] = x[:, 3] * 0.9 + 0.1 * x[:, 5]  # correlated inputs: where greedy rounding falls short
    wt = torch.randn(k, n, generator=g) * 0.05
    h = x.T @ x / rows
    return wt, h


def _gptq(wt, h, q):
    prep = gptq.prepare(h.clone())
    res = gptq.quantize(wt, prep, q)
    zero, top, scale = rounding.grid_rows(res.groups, res.qs, res.qscale_max, wt.shape[0])
    return prep, res, zero, top, scale


def test_grid_rows_matches_the_layout():
    q = qp((4, 32, 0.5), (3, 32, 0.5))
    groups = q.groups(64)
    qs = torch.randint(1, 17, (len(groups), 32))
    qmax = torch.tensor([0.5, 0.25])
    zero, top, scale = rounding.grid_rows(groups, qs, qmax, 64)
    assert zero[:32].eq(8).all() and top[:32].eq(15).all()
    assert zero[32:].eq(4).all() and top[32:].eq(7).all()
    assert torch.equal(scale[40], dequant_scale(qs[1], qmax[1]))
    with pytest.raises(ValueError):
        rounding.grid_rows(groups, qs, qmax, 96)


def test_descent_lowers_gptqs_error_on_the_same_grid():
    wt, h = _problem()
    prep, res, zero, top, scale = _gptq(wt, h, qp((3, 32, 1)))
    hp, _ = rounding.damped(h[prep.perm][:, prep.perm], damp=0.01)
    codes, q, before, after = rounding.descend(wt[prep.perm], res.codes, zero, top, scale, hp)
    assert after < 0.98 * before  # GPTQ is greedy: the descent finds lower points
    # the same grid: codes within each row's range, the decoded weight as the runtime decodes it
    assert codes.dtype == torch.int16 and (codes >= 0).all() and (codes.int() <= top).all()
    assert torch.equal(q, dequant(codes, zero, scale).float())
    assert before == pytest.approx(gptq.proxy_error(wt[prep.perm], res.q, hp), rel=1e-9)
    assert after == pytest.approx(gptq.proxy_error(wt[prep.perm], q, hp), rel=1e-9)


def test_descent_is_deterministic_and_never_worse():
    wt, h = _problem(seed=3)
    prep, res, zero, top, scale = _gptq(wt, h, qp((4, 32, 1)))
    hp, _ = rounding.damped(h[prep.perm][:, prep.perm])
    a = rounding.descend(wt[prep.perm], res.codes, zero, top, scale, hp)
    b = rounding.descend(wt[prep.perm], res.codes, zero, top, scale, hp)
    assert torch.equal(a[0], b[0])
    for sweeps in (1, 2):
        assert rounding.descend(wt[prep.perm], res.codes, zero, top, scale, hp, sweeps=sweeps)[3] <= a[2]


def test_descent_reaches_the_exact_optimum_of_a_tiny_column():
    # 4 rows, 2 bits, one column: all 4^4 codes checked by brute force
    k = 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, k, generator=g)
    x[:, 1] += 2 * x[:, 0]
    h = x.T @ x
    wt = torch.randn(k, 1, generator=g)
    zero = torch.full((k, 1), 2, dtype=torch.int32)
    top = torch.full((k, 1), 3, dtype=torch.int32)
    scale = torch.full((k, 1), 0.5, dtype=torch.float16)
    best = min(itertools.product(range(4), repeat=k),
               key=lambda c: gptq.proxy_error(wt, (torch.tensor(c).view(k, 1) - 2) * 0.5, h))
    start = torch.full((k, 1), 2, dtype=torch.int16)
    codes, _, _, after = rounding.descend(wt, start, zero, top, scale, h, sweeps=20)
    optimum = gptq.proxy_error(wt, (torch.tensor(best).view(k, 1) - 2) * 0.5, h)
    # coordinate descent finds a local optimum; on this problem it is the global one
    assert after == pytest.approx(optimum, rel=1e-6)


def test_asymmetric_target_pulls_towards_the_reference_outputs():
    # with inputs x_q that differ from the reference x, the objective ||x_q Q - x W||^2 is met
    # better by descending on (h, cross) than on h alone
    wt, _ = _problem(seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 64, generator=g)
    xq = x + 0.3 * torch.randn(512, 64, generator=g)
    hq, cross = xq.T @ xq / 512, xq.T @ x / 512
    prep, res, zero, top, scale = _gptq(wt, hq, qp((4, 32, 1)))
    p = prep.perm
    hp, cp = rounding.damped(hq[p][:, p], cross[p][:, p], damp=0.0)

    def true_error(q):
        return float((xq[:, p] @ q - x[:, p] @ wt[p]).square().sum())
    sym = rounding.descend(wt[p], res.codes, zero, top, scale, hp)[1]
    asym = rounding.descend(wt[p], res.codes, zero, top, scale, hp, cp)[1]
    assert true_error(asym) < true_error(sym)
    # a known-wrong cross term (the reference's sign flipped) must make it worse, not better
    wrong = rounding.descend(wt[p], res.codes, zero, top, scale, hp, -cp)[1]
    assert true_error(wrong) > true_error(res.q)
