import pytest
import torch

from exl2conv import gptq, ops
from exl2conv.coded import Coded
from exl2conv.pack import dequant, dequant_scale, maxq, qzero
from exl2conv.qparams import ATTN_OPTIONS, HEAD_OPTIONS, MLP_OPTIONS, qp


def literal_gptq(wt, prep, q):
    """ExLlamaV2's procedure (conversion/adaptivegptq.py, AdaptiveGPTQ.quantize), row by row with the
    lazy update at each group end."""
    k, n = wt.shape
    w = wt.float()[prep.perm].clone()
    u = prep.u
    codes = torch.empty(k, n, dtype=torch.int64)
    out = torch.empty(k, n)
    pos = 0
    for g in q.groups(k):
        a, b = pos, pos + g.rows
        qs, qmax, scale = gptq.find_params(w[a:b], g.bits, gptq.row_weights(u)[a:b])
        z, m = qzero(g.bits), maxq(g.bits)
        err = torch.empty(b - a, n)
        for c in range(a, b):
            code = torch.clamp(torch.round(w[c] / scale) + z, 0, m)
            qv = dequant(code, torch.tensor(z), scale).float()
            e = (w[c] - qv) / u[c, c]
            w[c:b] -= u[c, c:b].view(-1, 1) * e.view(1, -1)
            codes[c], out[c], err[c - a] = code, qv, e
        w[b:] -= u[a:b, b:].T @ err
        pos = b
    return codes, out[torch.argsort(prep.perm)]


def make_problem(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g) * torch.linspace(0.2, 3.0, k)  # uneven feature scales
    wt = torch.randn(k, n, generator=g) * 0.05
    h = gptq.Hessian(k)
    for row in x.split(64):
        h.add(row)
    return wt, h.normalized()


def test_hessian_normalized_by_rows_and_identity_when_empty():
    h = gptq.Hessian(32)
    assert torch.equal(h.normalized(), torch.eye(32))
    x = torch.randn(3, 10, 32)
    h.add_rows(x)
    ref = sum(r.T @ r for r in x) / 3
    assert torch.allclose(h.normalized(), ref, atol=1e-5)


def test_prepare_act_order_and_factor():
    wt, h = make_problem(64, 32)
    prep = gptq.prepare(h)
    d = torch.diagonal(h)[prep.perm]
    assert torch.all(d[:-1] >= d[1:])
    u = prep.u
    assert torch.allclose(u, torch.triu(u))
    hp = h[prep.perm][:, prep.perm]
    damp = 0.12 * torch.diagonal(hp).mean()
    hinv = torch.linalg.inv(hp + damp * torch.eye(64))
    assert torch.allclose(u.T @ u, hinv, rtol=1e-3, atol=1e-5)


def test_prepare_retries_damping_on_singular_hessian():
    h = torch.zeros(32, 32)
    h[0, 0] = -5.0  # damping of 0.12*mean stays negative once: needs retries, then fails
    with pytest.raises(Exception):
        gptq.prepare(h, "x")
    h = torch.ones(32, 32)  # rank one, positive: one damping round makes it definite
    prep = gptq.prepare(h, "x")
    assert torch.isfinite(prep.u).all()


def test_find_params_scale_is_fp16_runtime_arithmetic():
    x = torch.randn(64, 32) * 0.1
    qs, qmax, scale = gptq.find_params(x, 4)
    assert qs.min() >= 1 and qs.max() <= 16 and qmax.dtype == torch.float16
    expect = (qs * qs).half() * (qmax * torch.tensor(1 / 256, dtype=torch.float16))
    assert torch.equal(scale, expect.float())


@pytest.mark.parametrize("q", [qp((4, 32, 1)), qp((3, 64, 0.05), (2, 64, 0.95)),
                               qp((8, 32, 0.05), (4, 32, 0.1), (3, 32, 0.85)), qp((6, 32, 0.1), (5, 32, 0.9)),
                               qp((8, 128, 1)), HEAD_OPTIONS[6],
                               # groups that reach past a 128-row span of the lazy update
                               qp((4, 32, 0.15), (3, 128, 0.85)), qp((4, 32, 0.1), (3, 64, 0.9))])
def test_batched_gptq_matches_literal_procedure(q):
    wt, h = make_problem(320, 64)
    prep = gptq.prepare(h)
    res = gptq.quantize(wt, prep, q)
    codes, deq = literal_gptq(wt, prep, q)
    # identical except where the lazy-update summation order flips a rounding tie
    same = (res.codes.long() == codes).float().mean().item()
    assert same > 0.999
    assert torch.allclose(res.weight, deq, atol=2e-2)
    rel = (res.weight - deq).norm() / deq.norm()
    assert rel < 1e-3


def test_quantize_many_equals_one_at_a_time():
    wt, h = make_problem(416, 64, seed=1)  # several spans of the lazy update, groups reaching past them
    prep = gptq.prepare(h)
    cands = [row[0] for row in ATTN_OPTIONS[::3]] + [qp((4, 32, 0.15), (3, 128, 0.85))]
    many = gptq.quantize_many(wt, prep, cands)
    for q, r in zip(cands, many):
        one = gptq.quantize(wt, prep, q)
        assert torch.equal(one.codes, r.codes)
        assert torch.equal(one.weight, r.weight)


def test_gptq_beats_round_to_nearest_and_error_falls_with_bits():
    wt, h = make_problem(256, 64, seed=2)
    prep = gptq.prepare(h)
    errs = []
    for bits in (2, 3, 4, 5, 6, 8):
        q = qp((bits, 64, 1))
        r = gptq.quantize(wt, prep, q)
        errs.append(gptq.proxy_error(wt, r.weight, h))
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # plain RTN with the same scales at 4 bits is worse than GPTQ
    eye = gptq.Prepared(perm=prep.perm, u=torch.eye(256) * 1e-9)  # no error feedback
    rtn = gptq.quantize(wt, eye, qp((4, 64, 1)))
    assert gptq.proxy_error(wt, rtn.weight, h) > errs[2]


def test_mlp_table_runs_on_tiny_shapes():
    wt, h = make_problem(128, 96, seed=3)
    prep = gptq.prepare(h)
    cands = [row[2] for row in MLP_OPTIONS]
    res = gptq.quantize_many(wt, prep, cands, keep_codes=False)
    assert all(torch.isfinite(r.weight).all() for r in res)
    assert [sum(g.rows for g in r.groups) for r in res] == [128] * len(cands)


def weighted_sq_error(x, scale, bits, rw):
    lo, hi = -qzero(bits), maxq(bits) - qzero(bits)
    d = torch.clamp(torch.round(x / scale), lo, hi) * scale - x
    return (rw.view(-1, 1) * d * d).sum(0)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_refine_qs_never_worse_and_moves_by_one_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 256, generator=g) * torch.linspace(0.01, 1, 256)
    x[3, ::7] *= 6  # outliers: their columns round better with a smaller scale and one clipped value
    rw = torch.rand(64, generator=g) + 0.1
    plain, qmax, _ = gptq.find_params(x, bits, torch.zeros(64))  # all weights zero: nothing to improve
    qs, qmax2, scale = gptq.find_params(x, bits, rw)
    assert torch.equal(qmax, qmax2)  # the group's multiplier is the p-grid search's
    assert (qs - plain).abs().max() <= 1 and qs.min() >= 1 and qs.max() <= 16
    before = weighted_sq_error(x, dequant_scale(plain, qmax).float(), bits, rw)
    after = weighted_sq_error(x, scale, bits, rw)
    assert torch.all(after <= before)
    moved = qs != plain
    assert moved.any() and torch.all(after[moved] < before[moved])
    assert after.sum() < 0.98 * before.sum()


def test_scale_refinement_lowers_gptq_error(monkeypatch):
    wt, h = make_problem(256, 128, seed=4)
    prep = gptq.prepare(h)
    q = qp((4, 64, 1))
    refined = gptq.proxy_error(wt, gptq.quantize(wt, prep, q).weight, h)
    monkeypatch.setattr(ops, "refine_qs", lambda x, qs, *a: qs)
    plain = gptq.proxy_error(wt, gptq.quantize(wt, prep, q).weight, h)
    assert refined < 0.97 * plain


def test_find_params_many_equals_one_group_at_a_time():
    """Batching groups of different candidates, lengths and bit widths changes no value: the
    rows past a shorter group's end must not leak into its max."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(4, 256, 96, generator=g) * torch.linspace(0.01, 3, 96)
    w[1, 64:] *= 50  # a shorter group must not see these rows
    cidx, rows, bits = [0, 1, 3, 2], [128, 64, 32, 256], [4, 3, 8, 2]
    qs, qmax, scale = gptq.find_params_many(w, cidx, 0, rows, bits)
    for i, (c, r, b) in enumerate(zip(cidx, rows, bits)):
        q1, m1, s1 = gptq.find_params(w[c, :r], b)
        assert torch.equal(qs[i], q1) and torch.equal(qmax[i], m1) and torch.equal(scale[i], s1)
    # and at a later start row
    qs, qmax, _ = gptq.find_params_many(w, [2, 0], 96, [32, 160], [5, 6])
    assert torch.equal(qs[1], gptq.find_params(w[0, 96:256], 6)[0])


def test_passes_of_any_size_give_the_same_bits():
    """quantize_batches under a tight byte budget (one candidate per pass, then two) gives what
    one pass over all candidates gives: each candidate's arithmetic is its own."""
    wt, h = make_problem(416, 64, seed=5)
    prep = gptq.prepare(h)
    cands = [row[0] for row in ATTN_OPTIONS[::3]] + [qp((4, 32, 0.15), (3, 128, 0.85))]
    whole = gptq.quantize_many(wt, prep, cands)
    per = 416 * 64 * 6
    for budget, size in ((1, 1), (2 * per, 2)):
        assert gptq.batch_size(416, 64, len(cands), True, budget) == size
        got = [r for batch in gptq.quantize_batches(wt, prep, cands, max_bytes=budget) for r in batch]
        for a, b in zip(whole, got):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.q, b.q)
            assert torch.equal(a.qs, b.qs) and torch.equal(a.qscale_max, b.qscale_max)
    assert torch.equal(wt, make_problem(416, 64, seed=5)[0])  # the input is left alone
    # a Filler (each pass fills its candidates' rows itself, in permuted order) gives the same bits
    perm = prep.perm
    filler = gptq.Filler(tuple(wt.shape), wt.device, lambda out: out.copy_(wt[perm]))
    got = [r for batch in gptq.quantize_batches(filler, prep, cands, max_bytes=2 * per) for r in batch]
    for a, b in zip(whole, got):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.q, b.q)
    # every pass in one buffer: each pass's results, taken before the next, are the same bits
    buffer = torch.empty(2 * 416 * 64)
    filler = gptq.Filler(tuple(wt.shape), wt.device, lambda out: out.copy_(wt[perm]), buffer)
    i = 0
    for batch in gptq.quantize_batches(filler, prep, cands, max_bytes=2 * per):
        for b in batch:
            assert b.q.data_ptr() >= buffer.data_ptr()  # worked in the buffer
            assert torch.equal(whole[i].codes, b.codes) and torch.equal(whole[i].q, b.q)
            i += 1
    assert i == len(cands)


def test_batch_sizes_are_balanced():
    per = 32 * 32 * 6
    assert gptq.batch_size(32, 32, 14, True, 6 * per) == 5  # 5 + 5 + 4, not 6 + 6 + 2
    assert gptq.batch_size(32, 32, 14, True, None) == 14
    assert gptq.batch_size(32, 32, 3, False, 32 * 32 * 4) == 1


def test_coded_weight_decodes_to_the_dequantized_weight():
    """A Coded candidate (uint8 codes, float16 group scales) decodes bit for bit to GPTQ's
    weight in the HF orientation, padding columns dropped."""
    wt, h = make_problem(192, 64, seed=6)
    prep = gptq.prepare(h)
    cands = [qp((4, 32, 1)), qp((8, 32, 0.05), (4, 32, 0.1), (3, 32, 0.85)), qp((8, 64, 0.5), (2, 64, 0.5))]
    without = gptq.quantize_many(wt, prep, cands, keep_codes=False)
    for r, r_nc in zip(gptq.quantize_many(wt, prep, cands), without):
        coded = Coded.of(r, 50, prep.invperm)
        assert coded.codes.dtype == torch.uint8
        assert torch.equal(coded.codes, r.codes.to(torch.uint8))  # recovered from q: GPTQ's own codes
        assert torch.equal(Coded.of(r_nc, 50, prep.invperm).codes, coded.codes)
        got = coded.decode()
        assert got.dtype == torch.float16 and got.shape == (50, 192)
        assert torch.equal(got, r.weight[:, :50].T.to(torch.float16))
        assert torch.equal(got.float(), r.weight[:, :50].T)  # exact in float16


def test_padded_wt_in_permuted_order_equals_permuting_after():
    from types import SimpleNamespace

    from exl2conv.layers import padded_wt

    w = torch.randn(40, 96)  # [out, in]: N padded to 64
    spec = SimpleNamespace(in_features=96, out_features=40, padded_out=64)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(3))
    assert torch.equal(padded_wt(w, spec, perm), padded_wt(w, spec)[perm])
    out = torch.full((96, 64), float("nan"))  # written whole, the padding columns zeroed
    assert padded_wt(w.half(), spec, perm, out) is out
    assert torch.equal(out, padded_wt(w.half().float(), spec)[perm])


def test_coded_to_host_is_the_same_weight():
    wt, h = make_problem(128, 64, seed=6)
    prep = gptq.prepare(h)
    res = gptq.quantize(wt, prep, ATTN_OPTIONS[4][0])
    coded = Coded.of(res, 64, prep.invperm)
    assert coded.to_host() is coded  # already in host memory: nothing to move
    assert torch.equal(coded.decode(coded.codes.clone()), coded.decode())


def test_prepare_spends_a_hessian_accumulator():
    wt, h = make_problem(64, 32, seed=7)
    acc = gptq.Hessian(64)
    acc.h, acc.rows = h.clone(), 1
    by_acc = gptq.prepare(acc)
    assert acc.h is None
    by_tensor = gptq.prepare(h)
    assert torch.equal(by_acc.perm, by_tensor.perm) and torch.equal(by_acc.u, by_tensor.u)
