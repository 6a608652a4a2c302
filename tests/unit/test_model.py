"""exl2conv.model: config checks, the architecture table, the lazy weight index, and the float32
forward compared with transformers (module by module and end to end) on tiny random models."""

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.tinymodel import logits_with_hooks, trace_hooks
from safetensors.torch import load_file, save_file

from exl2conv.errors import Exl2Error, FormatError
from exl2conv.model import (WeightIndex, expected_tensors, head_spec, layer_linears, load_config,
                            unquantized_tensors)
from exl2conv.model import attention_kernels
from exl2conv.model import forward as fw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinymodel import make_tiny_llama  # noqa: E402

L = 24


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Max abs difference within tol, relative to the reference's scale (at least 1)."""
    assert ours.shape == ref.shape
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} exceeds {tol:.0e} x scale {scale:.3g}"


def ids_for(cfg, rows=2, length=L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (rows, length), generator=g)


def write_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg |= changes
    (path / "config.json").write_text(json.dumps(cfg))


# -- transformers as the reference ---------------------------------------------------------------

@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def hf_model(tf, path: Path):
    dtype_kw = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = tf.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", **{dtype_kw: torch.float32})
    return model.eval()


def hf_trace(model, ids):
    """Run transformers and record, per layer, the layer input and output and each
    intermediate our forward captures. Returns (logits, [dict per layer])."""
    trace = [dict() for _ in model.model.layers]
    hooks = []

    keep, keep_layer_input = trace_hooks(trace)

    for i, layer in enumerate(model.model.layers):
        hooks += [
            layer.register_forward_pre_hook(keep_layer_input(i), with_kwargs=True),
            layer.register_forward_hook(keep(i, "y")),
            layer.self_attn.register_forward_hook(keep(i, "attn_branch")),
            layer.input_layernorm.register_forward_hook(keep(i, "attn_post_norm")),
            layer.self_attn.o_proj.register_forward_hook(keep(i, "attn_output", True)),
            layer.post_attention_layernorm.register_forward_hook(keep(i, "mlp_post_norm")),
            layer.mlp.down_proj.register_forward_hook(keep(i, "pre_down", use_input=True)),
        ]
    return logits_with_hooks(model, ids, hooks), trace


def compare_with_transformers(tf, path: Path, ours_cfg=None, hf_path: Path | None = None,
                              ids=None) -> torch.Tensor:
    """Module-by-module and whole-model comparison; returns our logits."""
    cfg = ours_cfg or load_config(path)
    index = WeightIndex(path)
    index.check(expected_tensors(cfg))
    ids = ids_for(cfg) if ids is None else ids
    ref_logits, trace = hf_trace(hf_model(tf, hf_path or path), ids)

    rope = fw.RotaryCache(cfg)
    for i, t in enumerate(trace):
        w = fw.load_layer_weights(index, cfg, i, "attn")
        y, inter = fw.attention(t["x"], w, cfg, rope, capture=True, layer=i)
        mid = t["x"] + t["attn_branch"]
        close(y, mid)
        close(inter["post_norm"], t["attn_post_norm"])
        close(inter["attn_output"], t["attn_output"])
        y, inter = fw.mlp(mid, fw.load_layer_weights(index, cfg, i, "mlp"), cfg, capture=True)
        close(y, t["y"])
        close(inter["post_norm"], t["mlp_post_norm"])
        close(inter["pre_down"], t["pre_down"])

    ours = fw.run_model(index, cfg, ids)
    close(ours, ref_logits)
    return ours


LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("kwargs, variant", [
    pytest.param({}, {}, id="gqa"),
    pytest.param({"kv_heads": 4, "attention_bias": True, "mlp_bias": True}, {}, id="mha-biases"),
    pytest.param({"kv_heads": 1, "tie": True}, {}, id="mqa-tied"),
    pytest.param({"extra_config": {"head_dim": 32}}, {}, id="head_dim-field"),
    pytest.param({"dtype": torch.bfloat16, "shards": 2}, {}, id="bf16-sharded"),
    pytest.param({}, {"rope_scaling": LLAMA3}, id="llama3"),
    pytest.param({}, {"rope_scaling": YARN}, id="yarn"),
    pytest.param({}, {"rope_scaling": {"type": "linear", "factor": 3.0}}, id="linear-config"),
    pytest.param({"arch": "MistralForCausalLM"}, {}, id="mistral"),
    pytest.param({"arch": "MistralForCausalLM"}, {"extra_config": {"sliding_window": 8}},
                 id="mistral-window"),
])
def test_forward_matches_transformers(transformers, tmp_path, kwargs, variant):
    path = make_tiny_llama(tmp_path / "m", **kwargs, **variant)
    ours = compare_with_transformers(transformers, path)
    if variant:
        # The variant must change the result, or matching transformers proves nothing about it.
        plain = make_tiny_llama(tmp_path / "plain", **kwargs)
        cfg = load_config(plain)
        assert (ours - fw.run_model(WeightIndex(plain), cfg, ids_for(cfg))).abs().max() > 1e-2


@pytest.mark.parametrize("flag", ["rope_scale", "rope_alpha"])
def test_rs_ra_match_transformers_equivalents(transformers, tmp_path, flag):
    """-rs s equals a config with linear rope_scaling s; -ra a equals rope_theta * a^(d/(d-2))."""
    path = make_tiny_llama(tmp_path / "m")
    value = 2.5
    ref = make_tiny_llama(tmp_path / "ref")
    if flag == "rope_scale":
        write_config(ref, rope_scaling={"type": "linear", "factor": value})
    else:
        d = 16
        write_config(ref, rope_theta=10000.0 * value ** (d / (d - 2)))
    cfg = load_config(path, **{flag: value})
    ours = compare_with_transformers(transformers, path, ours_cfg=cfg, hf_path=ref)
    plain = fw.run_model(WeightIndex(path), load_config(path), ids_for(cfg))
    assert (ours - plain).abs().max() > 1e-2


# -- forward pieces without transformers ---------------------------------------------------------

def test_embed_clamps_out_of_range_and_negative_ids():
    table = torch.randn(10, 4, dtype=torch.float16)
    out = fw.embed(torch.tensor([[3, 10, 57, -1, 9]]), table)
    assert out.dtype == torch.float32 and out.shape == (1, 5, 4)
    expect = table.float()[[3, 0, 0, 0, 9]]
    assert torch.equal(out[0], expect)


def test_rms_norm_formula():
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    inv = 1 / math.sqrt(12.5 + 1e-5)
    assert torch.allclose(fw.rms_norm(x, w, 1e-5), torch.tensor([[3 * inv, 8 * inv]]))


def test_rope_tables_scale_alpha_and_dynamic(tmp_path):
    path = make_tiny_llama(tmp_path / "m")
    plain = load_config(path)
    cos, sin = fw.rope_tables(plain, 64)
    assert cos.shape == sin.shape == (64, 16) and cos.dtype == torch.float32
    assert torch.allclose(cos[:, :8], cos[:, 8:]) and torch.allclose(cos[0], torch.ones(16))
    # Linear scale 2: position 2p sees the angles of position p.
    cos2, sin2 = fw.rope_tables(load_config(path, rope_scale=2.0), 64)
    assert torch.allclose(cos2[::2], cos[:32], atol=1e-6) and torch.allclose(sin2[::2], sin[:32], atol=1e-6)
    # Alpha a: the same tables as rope_theta * a^(d/(d-2)).
    write_config(path, rope_theta=10000.0 * 4.0 ** (16 / 14))
    cos_t, _ = fw.rope_tables(load_config(path), 64)
    write_config(path, rope_theta=10000.0)
    cos_a, _ = fw.rope_tables(load_config(path, rope_alpha=4.0), 64)
    assert torch.allclose(cos_a, cos_t, atol=1e-6) and not torch.allclose(cos_a, cos, atol=1e-2)
    # Dynamic NTK is plain RoPE within max_position_embeddings.
    write_config(path, rope_scaling={"type": "dynamic", "factor": 4.0})
    dyn = load_config(path)
    assert dyn.rope_type == "dynamic" and torch.equal(fw.rope_tables(dyn, 64)[0], cos)


def test_rotary_cache_grows_and_slices(tmp_path):
    cfg = load_config(make_tiny_llama(tmp_path / "m"))
    cache = fw.RotaryCache(cfg)
    short = cache.get(10, "cpu")
    long = cache.get(600, "cpu")
    assert short[0].shape == (10, 16) and long[0].shape == (600, 16)
    assert torch.equal(long[0][:10], short[0]) and torch.equal(long[1], fw.rope_tables(cfg, 600)[1])


def test_attention_is_causal(tmp_path):
    """Changing the last token must not change any earlier position's output."""
    path = make_tiny_llama(tmp_path / "m")
    cfg, index = load_config(path), WeightIndex(path)
    w = fw.load_layer_weights(index, cfg, 0, "attn")
    x = torch.randn(1, 12, cfg.hidden_size)
    x2 = x.clone()
    x2[0, -1] += 1.0
    rope = fw.RotaryCache(cfg)
    y, _ = fw.attention(x, w, cfg, rope, layer=0)
    y2, inter = fw.attention(x2, w, cfg, rope.get(12, "cpu"), capture=True, layer=0)
    assert torch.equal(y[0, :-1], y2[0, :-1]) and not torch.allclose(y[0, -1], y2[0, -1])
    assert inter["attn_output"].shape == (1, 12, cfg.num_heads * cfg.head_dim)


def test_sliding_window_mask():
    cfg = type("C", (), {"sliding_window": 3})()
    assert fw._attn_mask(cfg, 3, "cpu") is None
    m = fw._attn_mask(cfg, 5, "cpu")
    assert m[4].tolist() == [False, False, True, True, True] and m[0].tolist() == [True] + [False] * 4


# -- architecture table --------------------------------------------------------------------------

def test_layer_linears_shapes_and_bias(tmp_path):
    path = make_tiny_llama(tmp_path / "m", kv_heads=1, attention_bias=True, vocab=300)
    cfg = load_config(path)
    lin = layer_linears(cfg, 1)
    assert list(lin) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    q, k, o, down = lin["q_proj"], lin["k_proj"], lin["o_proj"], lin["down_proj"]
    assert q.name == "model.layers.1.self_attn.q_proj" and q.tensor == q.name + ".weight"
    assert (q.in_features, q.out_features, q.padded_out) == (64, 64, 64)
    assert (k.out_features, k.padded_out) == (16, 32)       # one KV head of 16: padded to 32
    assert o.bias and o.bias_tensor == "model.layers.1.self_attn.o_proj.bias"
    assert not down.bias and down.bias_tensor is None and down.in_features == 128
    assert [x.hessian_input for x in lin.values()] == ["post_norm"] * 3 + ["attn_output"] + \
        ["post_norm"] * 2 + ["pre_down"]
    assert list(layer_linears(cfg, 0, "mlp")) == ["gate_proj", "up_proj", "down_proj"]
    assert unquantized_tensors(cfg, 1) == ["model.layers.1.input_layernorm.weight",
                                           "model.layers.1.post_attention_layernorm.weight"]
    head = head_spec(cfg, WeightIndex(path))
    assert (head.name, head.tensor, head.in_features, head.out_features, head.padded_out) == \
        ("lm_head", "lm_head.weight", 64, 300, 320)


def test_expected_tensors_match_a_written_model(tmp_path):
    path = make_tiny_llama(tmp_path / "m", attention_bias=True, mlp_bias=True, layers=3)
    cfg, index = load_config(path), WeightIndex(path)
    exp = expected_tensors(cfg)
    assert set(exp) == set(index.entries)          # nothing missing, nothing unaccounted for
    assert all(index.shape(n) == s for n, s in exp.items())
    assert list(exp)[0] == "model.embed_tokens.weight" and list(exp)[-1] == "lm_head.weight"


def test_head_spec_tied(tmp_path):
    path = make_tiny_llama(tmp_path / "m", tie=True)
    cfg, index = load_config(path), WeightIndex(path)
    assert "lm_head.weight" not in expected_tensors(cfg)
    head = head_spec(cfg, index)
    assert (head.name, head.tensor, head.padded_out) == ("lm_head", "model.embed_tokens.weight", 288)
    write_config(path, tie_word_embeddings=False)
    with pytest.raises(Exl2Error, match="lm_head.weight"):
        head_spec(load_config(path), index)


# -- weight index --------------------------------------------------------------------------------

def test_sharded_index_reads_the_same_tensors(tmp_path):
    one = WeightIndex(make_tiny_llama(tmp_path / "one"))
    three = WeightIndex(make_tiny_llama(tmp_path / "three", shards=3))
    assert len({e.file for e in three.entries.values()}) == 3 and set(one.entries) == set(three.entries)
    for name in one.entries:
        assert torch.equal(one.get(name), three.get(name))
    assert three.has("model.norm.weight") and "model.norm.weight" in three and not three.has("nope")


def test_entries_locate_each_tensors_bytes_in_its_file(tmp_path):
    """TensorEntry.offset/nbytes: the file's bytes there are the tensor's own (read ahead of use)."""
    index = WeightIndex(make_tiny_llama(tmp_path / "m", shards=2))
    for name, e in index.entries.items():
        with open(e.file, "rb") as f:
            f.seek(e.offset)
            raw = f.read(e.nbytes)
        t = index.get(name, dtype=index.source_dtype(name))
        assert e.nbytes == t.numel() * t.element_size() and raw == t.contiguous().view(torch.uint8).numpy().tobytes()


class _Requests:
    """Stands in for a WeightIndex's ReadAhead: records what it is asked to read."""

    def __init__(self):
        self.got = []

    def submit(self, ranges):
        self.got.append(ranges)


def test_loading_a_module_reads_the_next_one_ahead(tmp_path):
    """load_layer_weights asks for the next module's tensors: a layer's MLP after its attention,
    the next layer's attention after an MLP, the final norm and head after the last layer; each
    request covers exactly those tensors' bytes, adjacent ones merged into one range."""
    path = make_tiny_llama(tmp_path / "m", layers=2, attention_bias=True)
    cfg, index = load_config(path), WeightIndex(path)
    index.ahead = rec = _Requests()
    steps = [(0, "attn", fw.module_tensors(index, cfg, 0, "mlp")), (0, "mlp", fw.module_tensors(index, cfg, 1, "attn")),
             (1, "attn", fw.module_tensors(index, cfg, 1, "mlp")),
             (1, "mlp", ["model.norm.weight", head_spec(cfg, index).tensor])]
    assert "model.layers.1.self_attn.q_proj.bias" in steps[1][2]
    for i, part, want in steps:
        fw.load_layer_weights(index, cfg, i, part)
        ranges = rec.got.pop()
        assert sum(n for _, _, n in ranges) == sum(index.entries[w].nbytes for w in want)
        covered = {(f, o, o + n) for f, o, n in ranges}
        for w in want:  # every tensor inside one range
            e = index.entries[w]
            assert any(f == e.file and a <= e.offset and e.offset + e.nbytes <= b for f, a, b in covered)
        assert len(ranges) <= len(want) and all(r1[1] + r1[2] < r2[1] or r1[0] != r2[0] for r1, r2 in zip(ranges, ranges[1:]))
    assert not rec.got


def test_read_ahead_reads_the_bytes_and_survives_a_missing_file(tmp_path):
    from exl2conv.model.weights import ReadAhead

    path = make_tiny_llama(tmp_path / "m")
    index = WeightIndex(path)
    names = [n for n in index.entries if ".mlp." in n]
    index.read_ahead(names + ["not.a.tensor"])
    assert index.ahead.wait_idle()
    assert index.ahead.bytes_read == sum(index.entries[n].nbytes for n in names)
    ra = ReadAhead()
    ra.IDLE_S = 0.05
    ra.submit([(tmp_path / "gone.safetensors", 0, 100), (path / "model.safetensors", 8, 50)])
    assert ra.wait_idle() and ra.bytes_read == 50
    deadline = time.monotonic() + 10
    while ra._thread is not None and time.monotonic() < deadline:  # idle: the thread ends...
        time.sleep(0.01)
    assert ra._thread is None
    ra.submit([(path / "model.safetensors", 0, 20)] * 2)  # ...and the next request starts another
    assert ra.wait_idle() and ra.bytes_read == 90
    index.ahead = None  # reading ahead off: nothing asked, nothing read
    index.read_ahead(names)


@pytest.mark.parametrize("sendfile", [True, False])
def test_read_ahead_drops_a_request_once_a_newer_one_comes(tmp_path, sendfile):
    """Only the newest request is read: the thread stops an older one between chunks. Both ways
    of reading (sendfile into /dev/null, plain reads) count the bytes they read."""
    from exl2conv.model.weights import ReadAhead

    file = make_tiny_llama(tmp_path / "m") / "model.safetensors"
    ra = ReadAhead()
    ra.sendfile = sendfile and ra.sendfile
    ra.CHUNK = 16
    ra._pending = [(file, 0, 32)]  # a newer request already waiting
    ra._read([(file, 0, 1000)])
    assert ra.bytes_read == 0
    ra._pending = None
    ra.READ_CHUNK = 7
    ra._read([(file, 3, 40), (file, file.stat().st_size - 10, 50)])  # the second runs past the end
    assert ra.bytes_read == 50 and ra.sendfile == (sendfile and hasattr(os, "sendfile"))


def test_index_with_missing_shard(tmp_path):
    path = make_tiny_llama(tmp_path / "m", shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(Exl2Error, match="model-00002-of-00003.safetensors.*missing"):
        WeightIndex(path)


def test_index_naming_the_wrong_shard(tmp_path):
    path = make_tiny_llama(tmp_path / "m", shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Exl2Error, match="model.norm.weight"):
        WeightIndex(path)


def test_truncated_and_corrupt_files(tmp_path):
    path = make_tiny_llama(tmp_path / "m")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(FormatError, match=r"model\.safetensors is truncated"):
        WeightIndex(path)
    file.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(FormatError, match=r"model\.safetensors.*header"):
        WeightIndex(path)
    file.write_bytes(data[:8] + b"[" + data[9:])  # header JSON broken
    with pytest.raises(FormatError, match=r"model\.safetensors"):
        WeightIndex(path)


def test_pytorch_bin_only_and_no_weights(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    with pytest.raises(Exl2Error, match=r"no \*\.safetensors"):
        WeightIndex(path)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(Exl2Error, match="exl2conv to-safetensors"):
        WeightIndex(path)
    with pytest.raises(Exl2Error, match="not a folder"):
        WeightIndex(tmp_path / "absent")


def test_check_names_missing_and_misshapen_tensors(tmp_path):
    path = make_tiny_llama(tmp_path / "m")
    index = WeightIndex(path)
    write_config(path, intermediate_size=160)
    with pytest.raises(Exl2Error) as e:
        index.check(expected_tensors(load_config(path)))
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "model.safetensors" in msg
    assert "[128, 64]" in msg and "[160, 64]" in msg and "and 5 more" in msg and "\n" not in msg
    with pytest.raises(Exl2Error, match="'extra.weight' is missing"):
        index.check({"model.norm.weight": (64,), "extra.weight": (3,)})
    index.check({"model.norm.weight": (64,)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_get_reads_each_source_dtype(tmp_path, dtype):
    path = make_tiny_llama(tmp_path / "m", dtype=dtype)
    index = WeightIndex(path)
    raw = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert raw[name].dtype == dtype
    got = index.get(name)
    assert got.dtype == torch.float32 and torch.equal(got, raw[name].float())
    assert index.get(name, dtype=torch.float16, device="cpu").dtype == torch.float16
    # Same seed, any source dtype: the same values up to that dtype's rounding.
    ref = WeightIndex(make_tiny_llama(tmp_path / "f32", dtype=torch.float32)).get(name)
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-3)


def test_get_refuses_non_float_and_unknown(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    save_file({"a": torch.ones(4, dtype=torch.int8)}, str(path / "model.safetensors"))
    index = WeightIndex(path)
    assert index.shape("a") == (4,)
    with pytest.raises(Exl2Error, match="I8"):
        index.get("a")
    with pytest.raises(Exl2Error, match="'b' is not in"):
        index.get("b")


def test_duplicate_tensor_in_two_files(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    save_file({"a": torch.ones(2)}, str(path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(path / "y.safetensors"))
    with pytest.raises(Exl2Error, match="x.safetensors and y.safetensors"):
        WeightIndex(path)


# -- config --------------------------------------------------------------------------------------

def test_config_fields(tmp_path):
    path = make_tiny_llama(tmp_path / "m", arch="MistralForCausalLM",
                           extra_config={"eos_token_id": [257, 3], "sliding_window": 4096, "head_dim": None})
    cfg = load_config(path)
    assert (cfg.arch, cfg.head_dim, cfg.num_kv_heads, cfg.vocab_size) == ("MistralForCausalLM", 16, 2, 258)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.eos_token_id) == (256, (257, 3), 257)
    assert cfg.sliding_window == 4096 and cfg.rope_scaling is None and cfg.rope_type == "default"
    assert cfg.raw["model_type"] == "mistral" and cfg.norm_eps == 1e-5


def test_config_rope_options(tmp_path):
    path = make_tiny_llama(tmp_path / "m", rope_scaling={"type": "linear", "factor": 2.0})
    cfg = load_config(path)
    assert cfg.rope_type == "linear" and cfg.rope_scale == 2.0 and cfg.rope_base == 10000.0
    cfg = load_config(path, rope_scale=4.0, rope_alpha=2.0)  # -rs replaces the config's factor
    assert cfg.rope_scale == 4.0 and cfg.rope_base == pytest.approx(10000.0 * 2.0 ** (16 / 14))
    # transformers 5's rope_parameters form
    write_config(path, rope_scaling=None, rope_theta=None,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    cfg = load_config(path)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None and cfg.rope_scale == 1.0


@pytest.mark.parametrize("change, match", [
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"architectures": ["GPTNeoXForCausalLM"]}, "GPTNeoXForCausalLM.*LlamaForCausalLM, MistralForCausalLM"),
    ({"architectures": None}, "'architectures'"),
    ({"num_attention_heads": 3}, "hidden_size .64. is not divisible by num_attention_heads"),
    ({"intermediate_size": 100}, "intermediate_size is 100, not a multiple of 32"),
    ({"head_dim": 12}, r"num_attention_heads \* head_dim is 48"),
    ({"hidden_size": 80, "head_dim": 16}, "hidden_size is 80"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": "258"}, "'vocab_size' must be a positive integer"),
    ({"tie_word_embeddings": 1}, "'tie_word_embeddings' must be true or false"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_type 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs field 'low_freq_factor'"),
    ({"rope_scaling": {"type": "linear", "factor": -1}}, "'factor' must be a positive number"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_errors(tmp_path, change, match):
    path = make_tiny_llama(tmp_path / "m")
    write_config(path, **change)
    with pytest.raises(Exl2Error, match=match) as e:
        load_config(path)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(Exl2Error, match="config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Exl2Error, match="config.json is not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(Exl2Error, match="JSON object"):
        load_config(tmp_path)
    path = make_tiny_llama(tmp_path / "m")
    with pytest.raises(Exl2Error, match="-rs/--rope_scale"):
        load_config(path, rope_scale=0.0)


@pytest.mark.parametrize("length", [3, 7, 12, 16])
def test_blocked_attention_matches_causal_attention(monkeypatch, length):
    """attention_kernels.BlockedAttention (the GPU grad passes' float32 attention; its arithmetic is
    the same on a CPU) against PyTorch's causal attention in float64: outputs and all three gradients, with
    lengths below, at and across block edges."""
    import torch.nn.functional as F


    monkeypatch.setattr(attention_kernels, "BLOCK", 5)
    gen = torch.Generator().manual_seed(length)
    q, k, v, g = (torch.randn(2, 3, length, 8, dtype=torch.float64, generator=gen, requires_grad=True)
                  for _ in range(4))
    for scale in (None, 0.3):
        out = attention_kernels.BlockedAttention.apply(q, k, v, scale)
        ours = torch.autograd.grad(out, (q, k, v), g)
        ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        ref = torch.autograd.grad(ref_out, (q, k, v), g)
        assert torch.allclose(out, ref_out, atol=1e-12)
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, atol=1e-12)


def test_rows_per_call_are_larger_on_a_gpu(tmp_path):
    """pipeline.Context.chunk: a 1 GiB budget of intermediates on CUDA, 256 MiB on a CPU (the
    device need not exist to size the calls)."""
    from exl2conv import pipeline
    from tests.tinymodel import make_tiny_llama

    src = make_tiny_llama(tmp_path / "m", hidden=64, intermediate=1536)
    cfg = load_config(src)
    cpu = pipeline.Context(None, cfg, None, torch.device("cpu"), None).chunk(2048)  # type: ignore[arg-type]
    gpu = pipeline.Context(None, cfg, None, torch.device("cuda"), None).chunk(2048)  # type: ignore[arg-type]
    assert (cpu, gpu) == (5, 21)  # SmolLM2's MLP width at 2048 tokens: 16 rows in one call on a GPU
