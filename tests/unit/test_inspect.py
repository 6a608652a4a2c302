import math

import pytest
import torch
from safetensors.torch import save_file

from exl2conv.errors import FormatError
from exl2conv.inspect import format_report, inspect
from exl2conv.pack import decode_linear, pack_linear
from exl2conv.qparams import HEAD_OPTIONS, QParams, qp


def rtn_linear(w: torch.Tensor, layout: QParams, seed: int) -> dict[str, torch.Tensor]:
    """A plain round-to-nearest EXL2 linear for an HF weight w [out, in] (no Hessian): enough to give
    inspect() real, decodable tensors with a known source."""
    out, k = w.shape
    n = -(-out // 32) * 32
    wt = torch.zeros((k, n))
    wt[:, :out] = w.float().T
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    wt = wt[perm]
    groups = layout.groups(k)
    codes, qs, qsm = [], [], []
    row = 0
    for g in groups:
        x = wt[row:row + g.rows]
        z = 1 << (g.bits - 1)
        qmax = x.abs().amax() / (z - 1) + 1e-6
        qsm.append(qmax)
        qs.append(torch.full((n,), 16))                     # scale = q_scale_max for every column
        scale = qmax.to(torch.float16).float()
        codes.append(torch.clamp(torch.round(x / scale) + z, 0, 2 * z - 1).to(torch.int64))
        row += g.rows
    return pack_linear(torch.cat(codes), torch.stack(qs), torch.stack(qsm).to(torch.float16), groups,
                       torch.argsort(perm))


def prefixed(name: str, t: dict) -> dict:
    return {f"{name}.{k}": v for k, v in t.items()}


ATTN = qp((4, 32, 1))
MLP = qp((5, 32, 0.1), (4, 32, 0.9))


@pytest.fixture
def tiny_model(tmp_path):
    """A 1-layer model: q/o (64 -> 64), down (96 -> 40, padded to 64), tied head (64 -> 72, padded to 96),
    its quantized linears split over two shards, plus the FP16 weights in another folder."""
    gen = torch.Generator().manual_seed(0)
    fp16 = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen) * 0.05,
        "model.layers.0.self_attn.o_proj.weight": torch.randn(64, 64, generator=gen) * 0.05,
        "model.layers.0.mlp.down_proj.weight": torch.randn(40, 96, generator=gen) * 0.05,
        "model.embed_tokens.weight": torch.randn(72, 64, generator=gen) * 0.05,
    }
    fp16 = {k: v.to(torch.float16) for k, v in fp16.items()}
    layouts = {"model.layers.0.self_attn.q_proj": ATTN, "model.layers.0.self_attn.o_proj": ATTN,
               "model.layers.0.mlp.down_proj": MLP}
    linears = {name: rtn_linear(fp16[f"{name}.weight"], q, seed=i) for i, (name, q) in enumerate(layouts.items())}
    linears["lm_head"] = rtn_linear(fp16["model.embed_tokens.weight"], HEAD_OPTIONS[4], seed=9)
    model = tmp_path / "model"
    model.mkdir()
    names = list(linears)
    save_file({k: v for n in names[:2] for k, v in prefixed(n, linears[n]).items()}, model / "output-00001-of-00002.safetensors")
    save_file({k: v for n in names[2:] for k, v in prefixed(n, linears[n]).items()}
              | {"model.norm.weight": torch.ones(64, dtype=torch.float16)}, model / "output-00002-of-00002.safetensors")
    ref = tmp_path / "fp16"
    ref.mkdir()
    save_file(fp16, ref / "model.safetensors")
    return model, ref, linears, layouts, fp16


def test_folder_layouts_and_bitrates(tiny_model):
    model, _, linears, layouts, _ = tiny_model
    r = inspect(model)
    assert [x["name"] for x in r["layers"]] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    by_name = {x["name"]: x for x in r["layers"]}
    for name, q in layouts.items():
        k, n = (96, 64) if "down" in name else (64, 64)
        assert by_name[name]["desc"] == q.desc
        assert by_name[name]["bpw"] == pytest.approx(q.total_bits(k, n) / (k * n), rel=1e-12)
    bits = ATTN.total_bits(64, 64) * 2 + MLP.total_bits(96, 64)
    assert r["decoder_bpw"] == pytest.approx(bits / (2 * 64 * 64 + 96 * 64), rel=1e-12)
    assert by_name["lm_head"]["desc"] == HEAD_OPTIONS[4].desc
    assert r["head_bpw"] == pytest.approx(HEAD_OPTIONS[4].total_bits(64, 96) / (64 * 96), rel=1e-12)
    assert "rel_err_mean" not in r and "rel_err" not in by_name["lm_head"]
    text = format_report(r)
    assert "model.layers.0.mlp.down_proj" in text and MLP.desc in text
    assert f"decoder: {r['decoder_bpw']:.4f} bpw over 3 linears" in text
    assert f"head:    {r['head_bpw']:.4f} bpw" in text


def test_rel_err_against_fp16_with_tied_head(tiny_model):
    model, ref, linears, _, fp16 = tiny_model
    r = inspect(model, ref)
    by_name = {x["name"]: x for x in r["layers"]}
    for name, t in linears.items():
        src = fp16["model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"].float()
        dec = decode_linear(t).float().T[:src.shape[0]]
        want = float(torch.linalg.norm(dec - src) / torch.linalg.norm(src))
        assert by_name[name]["rel_err"] == pytest.approx(want, rel=1e-5), name
        assert 0.0 < want < 0.2, name  # RTN at 4-6 bits on Gaussian weights
    errs = [x["rel_err"] for x in r["layers"]]
    assert r["rel_err_max"] == max(errs) and r["rel_err_mean"] == pytest.approx(sum(errs) / 4)
    assert r["fp16_missing"] == []
    assert "rel_err" in format_report(r) and f"{r['rel_err_max']:.6f}" in format_report(r)


def test_rel_err_with_missing_and_mismatched_fp16(tiny_model, tmp_path):
    model, _, _, _, fp16 = tiny_model
    part = tmp_path / "part"
    part.mkdir()
    save_file({k: v for k, v in fp16.items() if "q_proj" in k}, part / "model.safetensors")
    r = inspect(model, part)
    assert r["fp16_missing"] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    assert "rel_err" in r["layers"][0] and math.isfinite(r["rel_err_mean"])
    assert "no FP16 weight for 3 linears" in format_report(r)

    none = tmp_path / "none"
    none.mkdir()
    save_file({"other.weight": torch.zeros(4, 4, dtype=torch.float16)}, none / "model.safetensors")
    with pytest.raises(FormatError, match="holds none of the quantized linears"):
        inspect(model, none)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file(fp16 | {"model.layers.0.mlp.down_proj.weight": torch.zeros(40, 64, dtype=torch.float16)},
              wrong / "model.safetensors")
    with pytest.raises(FormatError, match=r"down_proj has shape \[40, 64\]"):
        inspect(model, wrong)


def test_single_file_and_language_model_prefix(tmp_path):
    w = (torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.05).to(torch.float16)
    t = rtn_linear(w, ATTN, seed=0)
    f = tmp_path / "one.safetensors"
    save_file(prefixed("language_model.model.layers.0.self_attn.q_proj", t)
              | prefixed("language_model.lm_head", rtn_linear(w, HEAD_OPTIONS[8], seed=1)), f)
    r = inspect(f)
    assert r["decoder_bpw"] == pytest.approx(ATTN.bpw(64, 64), rel=1e-12)
    assert r["head_bpw"] == pytest.approx(HEAD_OPTIONS[8].bpw(64, 64), rel=1e-12)


# -- broken input ------------------------------------------------------------------------------------


def test_broken_files_name_the_file_and_tensor(tiny_model, tmp_path):
    model, _, linears, _, _ = tiny_model
    shard = model / "output-00002-of-00002.safetensors"
    data = shard.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-1000])
    with pytest.raises(FormatError) as e:
        inspect(truncated)
    assert str(truncated) in str(e.value) and "truncated" in str(e.value)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    with pytest.raises(FormatError) as e:
        inspect(junk)
    assert str(junk) in str(e.value)

    # One bad shard in a folder: the error names that shard.
    shard.write_bytes(data[:100])
    with pytest.raises(FormatError) as e:
        inspect(model)
    assert str(shard) in str(e.value)

    bad = dict(linears["model.layers.0.mlp.down_proj"])
    bad["q_scale"] = bad["q_scale"].to(torch.float16)
    wrong = tmp_path / "wrong_dtype.safetensors"
    save_file(prefixed("model.layers.0.mlp.down_proj", bad), wrong)
    with pytest.raises(FormatError) as e:
        inspect(wrong)
    assert str(e.value) == (f"{wrong}: model.layers.0.mlp.down_proj.q_scale: expected int32 [G, N/8] = [3, 8], "
                            "got float16 [3, 8]")


def test_no_quantized_linears(tmp_path):
    f = tmp_path / "plain.safetensors"
    save_file({"model.norm.weight": torch.ones(8, dtype=torch.float16)}, f)
    with pytest.raises(FormatError, match="no quantized linears"):
        inspect(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="no \\*.safetensors"):
        inspect(empty)
    with pytest.raises(FormatError, match="no such file"):
        inspect(tmp_path / "missing")


def test_duplicate_tensor_across_shards(tiny_model):
    model, _, linears, _, _ = tiny_model
    save_file(prefixed("lm_head", linears["lm_head"]), model / "extra.safetensors")
    with pytest.raises(FormatError, match="lm_head.q_.* is also in"):
        inspect(model)


# -- ExLlamaV2's own output --------------------------------------------------------------------------


def test_fixture_bitrates(fixture_dir):
    r = inspect(fixture_dir / "exllamav2-0.3.2_q4.0_tensors.safetensors")
    assert len(r["layers"]) == 211
    assert 3.9 < r["decoder_bpw"] <= 4.0 + 1e-6
    assert r["head_bpw"] == pytest.approx(6.48, abs=0.005)
    head = r["layers"][-1]
    assert head["name"] == "lm_head" and head["desc"] == HEAD_OPTIONS[6].desc
    assert all(x["desc"].endswith(" s4") for x in r["layers"])
    text = format_report(r)
    assert "decoder: 4.0000 bpw over 210 linears" in text and "head:    6.4798 bpw" in text
