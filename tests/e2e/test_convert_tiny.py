"""End to end on a tiny random Llama: conversion, determinism, resume after SIGKILL, -om/-m."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exl2conv import report
from exl2conv.cli import main
from exl2conv.inspect import inspect
from exl2conv.job import Job
from exl2conv.model import WeightIndex
from tests.tinymodel import make_tiny_llama

SMALL = ["-ml", "128", "-l", "128"]
BITS = ["4.0", "6.0"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=1)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("output*.safetensors"))}


def run_cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "exl2conv", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ref") / "work"
    out = work.parent / "out"
    rc = main(["-i", str(tiny), "-o", str(work), "-cf", str(out), "-b", "4.0", *SMALL])
    assert rc == 0
    return work, out


def test_tiny_converts_with_full_output(tiny, reference_run):
    work, out = reference_run
    assert (out / "output.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 6,
        "calibration": {"rows": 115, "length": 128, "dataset": "(default)"},
    }
    assert (out / "tokenizer.json").is_file()
    assert not list(out.glob("model*.safetensors"))
    res = inspect(out, tiny)
    assert res["decoder_bpw"] <= 4.0
    names = [layer["name"] for layer in res["layers"]]
    assert "lm_head" in names and len(names) == 2 * 7 + 1
    # random Gaussian weights at the low-bit end of the tables: the MLPs land near 2-3 bits
    assert all(layer["rel_err"] < 0.35 for layer in res["layers"])
    assert sum(layer["rel_err"] for layer in res["layers"]) / len(res["layers"]) < 0.2
    job = json.loads((work / "job.json").read_text())
    assert job["progress"] == "finished"
    meas = json.loads((work / "measurement.json").read_text())
    assert meas["last_module_idx"] == 2 * 2 + 2
    assert len(meas["measurement"]["model.layers.0.self_attn"]) == 19
    assert len(meas["measurement"]["model.layers.1.mlp"]) == 17
    assert meas["measurement"]["lm_head.linear"] is None
    # each entry's predicted KL (exl2conv.sensitivity), which the solver minimized
    pred = meas["exl2conv"]["predicted_kl"]
    assert set(pred) == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")}
    for key, kls in pred.items():
        entries = meas["measurement"][key]
        assert len(kls) == len(entries) and all(k >= 0 for k in kls)
        # the most bits predict less damage than the fewest
        most = max(range(len(entries)), key=lambda i: entries[i]["total_bits"])
        least = min(range(len(entries)), key=lambda i: entries[i]["total_bits"])
        assert kls[most] < kls[least]
    assert job["solver"]["predicted_kl"] > 0 and job["solver"]["gap"] == 0
    # norm tweaking (exl2conv.tweak): every module and the head fitted, no loss raised, some lowered
    tweaks = [r["tweak"] for r in job["quant_log"] if "tweak" in r]
    assert len(tweaks) == 2 * 2 + 1
    assert all(after <= before for before, after in tweaks) and any(after < before for before, after in tweaks)
    summary = report.format_summary(report.summarize(Job.load(work)))
    assert "norm tweaking: module output error on its rows -" in summary and "KL at the head" in summary


def test_no_tweak_keeps_the_source_norms(tiny, reference_run, tmp_path):
    """EXL2CONV_NO_TWEAK=1 on the same measurement: the norms are the source's, and the
    tweaked ones of the default run differ from them."""
    work, out = reference_run
    plain = tmp_path / "out"
    r = run_cli(["-i", str(tiny), "-o", str(tmp_path / "w"), "-cf", str(plain), "-b", "4.0", *SMALL,
                 "-m", str(work / "measurement.json")], {"EXL2CONV_NO_TWEAK": "1"})
    assert r.returncode == 0, r.stderr
    src = WeightIndex(tiny)
    with safe_open(str(plain / "output.safetensors"), framework="pt") as a, \
            safe_open(str(out / "output.safetensors"), framework="pt") as b:
        for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                     "model.norm.weight"):
            assert torch.equal(a.get_tensor(name), src.get(name, dtype=torch.float16)), name
            assert not torch.equal(b.get_tensor(name), a.get_tensor(name)), name


def test_same_command_twice_gives_identical_bytes(tiny, reference_run, tmp_path):
    _, out = reference_run
    out2 = tmp_path / "out"
    assert main(["-i", str(tiny), "-o", str(tmp_path / "work"), "-cf", str(out2), "-b", "4.0", *SMALL]) == 0
    assert digest(out2) == digest(out)


@pytest.mark.parametrize("fault", ["module:2", "module:5", "module:9", "write:3", "write:12", "stage:4", "stage:7"])
def test_sigkill_then_resume_is_byte_identical(tiny, reference_run, tmp_path, fault):
    _, out = reference_run
    work, out2 = tmp_path / "work", tmp_path / "out"
    args = ["-i", str(tiny), "-o", str(work), "-cf", str(out2), "-b", "4.0", *SMALL, "-cpi", "0"]
    first = run_cli(args, {"EXL2CONV_FAULT": fault})
    assert first.returncode == -9, first.stderr[-2000:]
    second = run_cli(args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert digest(out2) == digest(out)


def test_measure_only_then_reuse_at_two_bitrates(tiny, tmp_path):
    mfile = tmp_path / "m.json"
    assert main(["-i", str(tiny), "-o", str(tmp_path / "w0"), "-om", str(mfile), *SMALL]) == 0
    data = json.loads(mfile.read_text())
    # ExLlamaV2 reads these two keys; "exl2conv" (the fingerprint) is ours and ignored by it
    assert set(data) == {"measurement", "last_module_idx", "exl2conv"}
    sizes = []
    for b in BITS:
        out = tmp_path / f"out{b}"
        assert main(["-i", str(tiny), "-o", str(tmp_path / f"w{b}"), "-m", str(mfile), "-cf", str(out), "-b", b, *SMALL]) == 0
        res = inspect(out)
        assert res["decoder_bpw"] <= float(b)
        # the predicted KL travelled with the measurement: the reusing job solved on it
        assert "predicted_kl" in json.loads((tmp_path / f"w{b}" / "job.json").read_text())["solver"]
        sizes.append(res["decoder_bpw"])
    assert sizes[0] < sizes[1]


def test_resume_with_changed_arguments_is_refused(tiny, tmp_path, capsys):
    work = tmp_path / "w"
    args = ["-i", str(tiny), "-o", str(work), "-b", "4.0", *SMALL]
    # stage:5 stops the job after optimize (begin, initial_embeddings, sensitivity, measure_quant,
    # optimize): from then on -b is frozen (before, it may change)
    env_fault = run_cli(args, {"EXL2CONV_FAULT": "stage:5"})
    assert env_fault.returncode == -9
    rc = main(["-i", str(tiny), "-o", str(work), "-b", "5.0", *SMALL])
    assert rc == 1
    err = capsys.readouterr().err
    assert "-b: saved 4.0, given 5.0" in err and "-nr" in err and "Traceback" not in err
    assert main(["-o", str(work)]) == 0  # what is not given comes from the job


def test_no_resume_refuses_foreign_folder(tiny, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    assert main(["-i", str(tiny), "-o", str(foreign), "-nr", *SMALL]) == 1
    assert (foreign / "cat.jpg").read_bytes() == b"meow"
    assert "no exl2conv job" in capsys.readouterr().err


def test_output_inside_input_is_refused(tiny, capsys):
    assert main(["-i", str(tiny), "-o", str(tiny / "work")]) == 1
    assert "inside" in capsys.readouterr().err
    assert not (tiny / "work").exists()
