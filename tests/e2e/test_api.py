"""The Python API: exl2conv.convert(...) and Exl2Quantizer give the CLI's files; import stays light."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import exl2conv
from exl2conv.cli import main
from exl2conv.errors import Exl2Error
from tests.tinymodel import make_tiny_llama

SMALL = ["-ml", "128", "-l", "128"]
REPO = Path(__file__).resolve().parents[2]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=3)


@pytest.fixture(scope="module")
def cli_out(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["-i", str(tiny), "-o", str(root / "work"), "-cf", str(root / "out"), "-b", "4.0", *SMALL]) == 0
    return root / "out"


def test_import_is_light():
    code = "import sys, exl2conv; print('torch' in sys.modules, 'exl2conv.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_convert_function_matches_cli(tiny, cli_out, tmp_path):
    s = exl2conv.convert(tiny, tmp_path / "work", bits=4.0, compile_full=tmp_path / "out",
                         length=128, measurement_length=128, quiet=True)
    assert digest(tmp_path / "out") == digest(cli_out) and digest(cli_out)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((cli_out / "config.json").read_text())
    assert s.decoder_bpw is not None and s.decoder_bpw <= 4.0
    assert s.output_files == [str((tmp_path / "out" / "output.safetensors").resolve())]
    # the job module returns its Summary
    from exl2conv.report import Summary
    assert isinstance(s, Summary)


def test_convert_function_errors(tiny, tmp_path):
    with pytest.raises(TypeError, match="no_such_option"):
        exl2conv.convert(tiny, tmp_path / "w", no_such_option=1)
    with pytest.raises(Exl2Error, match="-hb 7"):
        exl2conv.convert(tiny, tmp_path / "w", head_bits=7)


def test_quantizer_on_transformers_model(tiny, cli_out, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tiny))
    q = exl2conv.Exl2Quantizer(bits=4.0, length=128, measurement_length=128, quiet=True)
    assert q.head_bits == 6 and exl2conv.Exl2Quantizer(bits=6.5).head_bits == 8
    with pytest.raises(Exl2Error, match="quantize_model"):
        q.save(tmp_path / "early")
    summary = q.quantize_model(model, tok)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast
    dest = q.save(tmp_path / "saved")
    # the same weights in, so the same EXL2 tensors out as the CLI on the original folder
    assert digest(dest) == digest(cli_out)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4.0 and cfg["quantization_config"]["head_bits"] == 6
    assert (dest / "tokenizer.json").is_file()
    assert summary.decoder_bpw <= 4.0
    q.cleanup()
