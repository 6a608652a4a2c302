"""`exl2conv eval --runtime` on a tiny converted Llama: the runtime's scores and its logits against
the float32 decoded forward eval runs, within FP16 noise, and the check failing on a wrong loader."""

import json
import math

import pytest

from exl2conv.cli import main
from tests.e2e.test_runtime import F16_BOUND, F32_BOUND, _ignore_invperm

pytest.importorskip("transformers")

WINDOWS = ["--ctx", "64", "--rows", "4", "--json"]
BOUNDS = {"float16": F16_BOUND, "float32": F32_BOUND}


def _eval(capsys, out, src, *extra) -> dict:
    assert main(["eval", str(out), "--fp16", str(src), *WINDOWS, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def check_runtime_scores(res: dict) -> None:
    """The runtime's logits within FP16 noise of the decoded forward's (BOUNDS, from
    tests/e2e/test_runtime.py: ~10 roundings of 2^-11 on any path to a logit for float16). A log
    probability moves by at most twice the largest logit change, so perplexity (in log) and the
    mean KL move by at most 2 * bound * the largest logit."""
    rt = res["runtime"]
    bound = BOUNDS[rt["dtype"]]
    assert rt["logit_err"] < bound, f"logits off by {rt['logit_err']:.2e} of the largest, bound {bound:.0e}"
    slack = 2 * bound * rt["max_logit"]
    assert abs(math.log(rt["ppl"]) - math.log(res["ppl"])) <= slack
    assert abs(rt["kl"] - res["kl"]) <= slack


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_eval_through_the_runtime(tiny_exl2, capsys, dtype):
    out, src = tiny_exl2
    res = _eval(capsys, out, src, "--runtime", "--runtime-dtype", dtype)
    assert res["runtime"]["dtype"] == dtype
    check_runtime_scores(res)
    plain = _eval(capsys, out, src)
    assert "runtime" not in plain
    assert {k: plain[k] for k in ("ppl", "kl", "top1")} == {k: res[k] for k in ("ppl", "kl", "top1")}


def test_the_check_fails_on_a_wrong_runtime(tiny_exl2, capsys, monkeypatch):
    """A runtime that ignores q_invperm is caught by the logits bound."""
    out, src = tiny_exl2
    _ignore_invperm(monkeypatch)
    res = _eval(capsys, out, src, "--runtime", "--runtime-dtype", "float16")
    with pytest.raises(AssertionError, match="logits off"):
        check_runtime_scores(res)


def test_runtime_flags_are_checked(tiny_exl2, capsys):
    out, src = tiny_exl2
    assert main(["eval", str(out), "--fp16", str(src), *WINDOWS, "--runtime-dtype", "float16"]) == 1
    assert "--runtime-dtype goes with --runtime" in capsys.readouterr().err
    assert main(["eval", str(out / "output.safetensors"), "--fp16", str(src), *WINDOWS, "--runtime"]) == 1
    assert "--runtime loads an EXL2 model folder" in capsys.readouterr().err
