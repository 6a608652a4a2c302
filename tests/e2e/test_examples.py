"""Every script in examples/ runs on a tiny model with small settings and leaves the output it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exl2conv.inspect import inspect
from tests.tinymodel import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SMALL = ["--", "-ml", "128", "-l", "128"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=4)


def run(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_every_example_is_tested():
    tested = {"quantize_for_webui.py", "measure_once_many_bitrates.py", "resume.py", "head_bits.py",
              "bin_to_safetensors.py", "custom_parquet.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_quantize_for_webui(tiny, tmp_path):
    run("quantize_for_webui.py", tiny, "--bits", "4.0", "--webui", tmp_path / "webui", *SMALL, cwd=tmp_path)
    out = tmp_path / "webui" / "models" / "model-4bpw-exl2"
    assert (out / "output.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4.0


def test_measure_once_many_bitrates(tiny, tmp_path):
    run("measure_once_many_bitrates.py", tiny, "--out", tmp_path / "o", "--bits", "4.0", "5.0", *SMALL, cwd=tmp_path)
    assert (tmp_path / "o" / "measurement.json").is_file()
    low = inspect(tmp_path / "o" / "model-4bpw-exl2")["decoder_bpw"]
    high = inspect(tmp_path / "o" / "model-5bpw-exl2")["decoder_bpw"]
    assert low <= 4.0 < high <= 5.0
    job = json.loads((tmp_path / "o" / "work-5" / "job.json").read_text())
    assert job["reuse_measurement"] and "measure_quant" not in (job.get("times") or {})


def test_resume(tiny, tmp_path):
    proc = run("resume.py", tiny, "--out", tmp_path / "r", "--stop-after", "3", *SMALL, cwd=tmp_path)
    assert "first run exited with" in proc.stdout
    assert (tmp_path / "r" / "model" / "output.safetensors").is_file()
    assert json.loads((tmp_path / "r" / "work" / "job.json").read_text())["progress"] == "finished"


def test_head_bits(tiny, tmp_path):
    proc = run("head_bits.py", tiny, "--bits", "6.0", "--out", tmp_path / "h", *SMALL, cwd=tmp_path)
    res = inspect(tmp_path / "h" / "model")
    assert res["head_bpw"] > 8.0  # 8b g128 plus overhead
    assert "head bits 8" in proc.stdout


def test_bin_to_safetensors(tiny, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    sd = load_file(str(tiny / "model.safetensors"))
    torch.save(sd, src / "pytorch_model.bin")
    for f in tiny.iterdir():
        if not f.name.endswith(".safetensors"):
            (src / f.name).write_bytes(f.read_bytes())
    run("bin_to_safetensors.py", src, "--out", tmp_path / "b", *SMALL, cwd=tmp_path)
    back = load_file(str(tmp_path / "b" / "safetensors" / "model.safetensors"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert (tmp_path / "b" / "model" / "output.safetensors").is_file()


def test_custom_parquet(tiny, tmp_path):
    texts = []
    for i in range(3):
        t = tmp_path / f"t{i}.txt"
        t.write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 40)
        texts.append(t)
    run("custom_parquet.py", tiny, *texts, "--out", tmp_path / "c", "--bits", "4.0", *SMALL, "-r", "4", "-mr", "2",
        cwd=tmp_path)
    cfg = json.loads((tmp_path / "c" / "model" / "config.json").read_text())["quantization_config"]
    assert cfg["calibration"] == {"rows": 4, "length": 128, "dataset": "calibration.parquet"}
    assert inspect(tmp_path / "c" / "model")["decoder_bpw"] <= 4.0
