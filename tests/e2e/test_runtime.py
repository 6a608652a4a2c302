"""The EXL2 runtime on a tiny Llama converted on the CPU: its logits against the float32 decoded
forward `exl2conv eval` runs (evaluate.decoded_logits), greedy generate() against that forward
token by token, and each check failing on a deliberately wrong variant of the loader."""

import json

import pytest
import torch

from exl2conv.cli import main
from exl2conv.evaluate import decoded_logits
from exl2conv.runtime import Exl2ForCausalLM
from tests.e2e.conftest import TINY_ROWS
from tests.runtime_checks import (F16_BOUND, F32_BOUND, _bias_as_stored, _ignore_invperm, check_generate,
                                  check_logits, greedy_reference)
from tests.tinymodel import make_tiny_llama

pytest.importorskip("transformers")

# Biased attention and MLP: the gate/up biases are stored in the down projection's q_perm order.
ROWS = TINY_ROWS


@pytest.fixture(scope="module")
def out(tiny_exl2):
    """The session's tiny biased Llama (tests/e2e/conftest.py: this recipe, converted once)."""
    return tiny_exl2[0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(out, ids):
    return decoded_logits(out, ids)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, F32_BOUND), (torch.float16, F16_BOUND)])
def test_logits_match_the_decoded_forward(out, ids, reference, dtype, bound):
    model = Exl2ForCausalLM.from_quantized(out, device="cpu", dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == dtype
    check_logits(model, ids, reference, bound)


def test_greedy_generate_follows_the_decoded_forward(out, ids):
    model = Exl2ForCausalLM.from_quantized(out, dtype=torch.float32)
    check_generate(model, out, ids[:1, :6])


@pytest.mark.parametrize("wrong", [_ignore_invperm, _bias_as_stored])
def test_checks_fail_on_a_wrong_loader(out, ids, reference, monkeypatch, wrong):
    """Each check above fails when the loader ignores q_invperm, or adds the gate/up biases in the
    order the file stores them (ExLlamaV2's runtime order) instead of the model's."""
    wrong(monkeypatch)
    model = Exl2ForCausalLM.from_quantized(out, dtype=torch.float32)
    with pytest.raises(AssertionError, match="logits off"):
        check_logits(model, ids, reference, F16_BOUND)
    with pytest.raises(AssertionError):
        check_generate(model, out, ids[:1, :6])


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_the_other_supported_architectures(tmp_path, ids, arch):
    """Qwen2's q/k/v biases, a Qwen2 written by transformers itself (tests.tinymodel.make_tiny_hf)
    with its generation_config.json: converted, loaded, checked as above. Every other architecture
    (Qwen3's q/k norms, stored once per head, among them) is checked on the outputs
    test_architectures.py and test_moe_architectures.py convert (tests.runtime_checks.check_runtime)."""
    from tests.tinymodel import make_tiny_hf

    if arch == "MistralForCausalLM":  # a Llama under another name, written as tests write Llamas
        src = make_tiny_llama(tmp_path / "src", seed=2, arch=arch)
    else:
        src = make_tiny_hf(tmp_path / "src", arch, seed=2)
    assert main(["-i", str(src), "-o", str(tmp_path / "w"), "-cf", str(tmp_path / "out"), *ROWS]) == 0
    model = Exl2ForCausalLM.from_quantized(tmp_path / "out", dtype=torch.float32)
    assert type(model).__name__ == arch
    if arch != "MistralForCausalLM":  # transformers' save_pretrained wrote one, -cf copied it
        saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
        assert model.generation_config.eos_token_id == saved["eos_token_id"] == 257
    check_logits(model, ids, decoded_logits(tmp_path / "out", ids), F32_BOUND)
    check_generate(model, tmp_path / "out", ids[:1, :6], steps=4)


def test_generate_command_streams_the_greedy_continuation(out, capsys):
    import re

    from transformers import AutoTokenizer

    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tok("Hello", return_tensors="pt").input_ids
    want = tok.decode(greedy_reference(out, prompt, 6)[0, prompt.shape[1]:])
    streamed, _, last = text.rstrip("\n").rpartition("\n")
    assert streamed == "Hello" + want
    assert re.fullmatch(r" -- 6 new tokens in [\d.]+ s \(prefill included\), [\d.]+ tokens/s; peak RSS [\d.]+ GiB", last)
    assert main(["generate", str(out), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens 0: give at least 1" in capsys.readouterr().err
