"""``AutoModelForCausalLM.from_pretrained(exl2_folder)`` after ``import exl2conv`` (issue 30): the
``exl2`` quantization method registered in either import order (fresh interpreters), its logits
against the float32 decoded forward, sharded folders with per-head norms, and the refusals."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from exl2conv.cli import main
from exl2conv.errors import Exl2Error
from exl2conv.evaluate import decoded_logits
from exl2conv.runtime import Exl2ForCausalLM
from tests.e2e.conftest import TINY_ROWS
from tests.e2e.test_runtime import F16_BOUND, F32_BOUND, check_logits

pytest.importorskip("transformers")

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
IMPORTS = {"exl2conv first": "import exl2conv\nimport transformers",
           "transformers first": "from transformers import AutoModelForCausalLM\nimport exl2conv",
           "no exl2conv": "import transformers"}
SCRIPT = """
{imports}
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(type(model.lm_head).__name__, model.config.quantization_config.quant_method)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def _fresh(imports: str, *args) -> subprocess.CompletedProcess:
    code = textwrap.dedent(SCRIPT).format(imports=imports)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.mark.parametrize("order", ["exl2conv first", "transformers first"])
def test_from_pretrained_in_either_import_order(tiny_exl2, tiny_ids, tmp_path, order):
    out, _ = tiny_exl2
    torch.save(tiny_ids, tmp_path / "ids.pt")
    run = _fresh(IMPORTS[order], out, tmp_path / "ids.pt", tmp_path / "logits.pt")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["Exl2Linear", "exl2"]
    got = torch.load(tmp_path / "logits.pt")
    ref = decoded_logits(out, tiny_ids)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < F32_BOUND, err


def test_without_exl2conv_transformers_cannot_load_it(tiny_exl2, tiny_ids, tmp_path):
    """The import-order check above fails where nothing registers exl2: transformers looks for
    model.safetensors, which an EXL2 folder does not hold."""
    out, _ = tiny_exl2
    torch.save(tiny_ids, tmp_path / "ids.pt")
    run = _fresh(IMPORTS["no exl2conv"], out, tmp_path / "ids.pt", tmp_path / "logits.pt")
    assert run.returncode != 0 and "model.safetensors" in run.stderr


def test_import_exl2conv_stays_light():
    code = ("import sys, exl2conv, exl2conv.hf_hook as h\n"
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules), "
            "h._FINDER in sys.meta_path)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] True"


@pytest.mark.parametrize("dtype, bound", [(torch.float32, F32_BOUND), (torch.float16, F16_BOUND)])
def test_from_pretrained_is_from_quantized(tiny_exl2, tiny_ids, dtype, bound):
    from transformers import AutoModelForCausalLM

    out, _ = tiny_exl2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == dtype and model.lm_head.q_scale_max.dtype == torch.float16
    check_logits(model, tiny_ids, decoded_logits(out, tiny_ids), bound)
    with torch.no_grad():
        same = Exl2ForCausalLM.from_quantized(out, dtype=dtype)(tiny_ids).logits
        assert torch.equal(model(tiny_ids).logits, same)


def test_gate_up_bias_left_in_the_stored_order_is_caught(tiny_exl2, tiny_ids, monkeypatch):
    """The logits check fails when the loader keeps the MLP's gate/up biases in the order the file
    stores them (ExLlamaV2's runtime order) instead of the model's."""
    from transformers import AutoModelForCausalLM

    import exl2conv.runtime.hf_quantizer as hq

    out, _ = tiny_exl2
    monkeypatch.setattr(hq, "model_order_bias", lambda bias, invperm: bias)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with pytest.raises(AssertionError, match="logits off"):
        check_logits(model, tiny_ids, decoded_logits(out, tiny_ids), F16_BOUND)


def test_sharded_qwen3_with_head_norms(tmp_path, tiny_ids):
    """Three shards (transformers is given the first; the quantizer adds the others) and Qwen3's
    q/k norms, stored once per head."""
    from transformers import AutoModelForCausalLM

    from tests.tinymodel import make_tiny_hf

    src = make_tiny_hf(tmp_path / "src", "Qwen3ForCausalLM", seed=2)
    out = tmp_path / "out"
    assert main(["-i", str(src), "-o", str(tmp_path / "w"), "-cf", str(out), "-ss", "0.04", *TINY_ROWS]) == 0
    assert len(list(out.glob("output-*.safetensors"))) == 3
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    check_logits(model, tiny_ids, decoded_logits(out, tiny_ids), F32_BOUND)


def test_refusals_are_one_line(tiny_exl2, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = tiny_exl2
    bad = tmp_path / "gpt2"
    bad.mkdir()
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
           "quantization_config": json.loads((out / "config.json").read_text())["quantization_config"]}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exl2Error, match="architecture GPT2LMHeadModel: .*load this one with exl2conv.Exl2ForCausalLM.from_quantized"):
        AutoModelForCausalLM.from_pretrained(bad)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((out / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "output.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, cut / "output.safetensors")
    with pytest.raises(Exl2Error, match="model.norm.weight is missing from the EXL2 files"):
        AutoModelForCausalLM.from_pretrained(cut)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:-2].clone()
    save_file(tensors, cut / "output.safetensors")
    with pytest.raises(Exl2Error, match=r"model.embed_tokens.weight: expected shape \[258, 64\], got \[256, 64\]"):
        AutoModelForCausalLM.from_pretrained(cut)
