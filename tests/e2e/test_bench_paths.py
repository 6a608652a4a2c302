"""benchmarks/bench_paths.py and compare_measurements.py run end to end on a tiny model (on a CPU
every run is a CPU run, so the same command twice must agree exactly: this also checks that a
conversion is deterministic across processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tinymodel import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def bench(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only run of the script")
def test_bench_paths_compares_two_runs_and_their_measurements(tmp_path):
    model = make_tiny_llama(tmp_path / "model", seed=7)
    work = tmp_path / "work"
    refused = bench("bench_paths.py", "--model", model, "--work", work)
    assert refused.returncode == 1 and "needs a CUDA device" in refused.stdout
    proc = bench("bench_paths.py", "--model", model, "--work", work, "--length", "128", "--allow-cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "relative difference mean 0.000 %" in out
    assert "the same option for 4 of 4 modules" in out
    assert "KL gpu / cpu: 1.0000" in out
    assert "every run was a CPU run" in out
    for name in ("gpu", "cpu"):
        assert (work / f"{name}-out" / "output.safetensors").is_file()
        assert (work / f"{name}-work" / "measurement.json").is_file()

    # a changed measurement: compare_measurements reports the difference and the changed choice
    doc = json.loads((work / "cpu-work" / "measurement.json").read_text())
    key = "model.layers.0.mlp"
    for e in doc["measurement"][key]:
        e["accuracy"] = 1 - (1 - e["accuracy"]) * 1.5
    doc["exl2conv"]["predicted_kl"][key] = [k * 50 for k in doc["exl2conv"]["predicted_kl"][key]]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(doc))
    cmp = bench("compare_measurements.py", work / "cpu-work" / "measurement.json", changed, "--model", model)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    lines = cmp.stdout.splitlines()
    assert "72 measured errors in 4 modules" in lines[0] and f"worst 33.333 % ({key}" in lines[0]
    assert "the same option for 4 of 4" not in lines[1]
    assert any(line.strip().startswith(key + ":") for line in lines[2:])

    other = tmp_path / "other.json"
    doc["measurement"].pop(key)
    other.write_text(json.dumps(doc))
    cmp = bench("compare_measurements.py", work / "cpu-work" / "measurement.json", other, "--model", model)
    assert cmp.returncode == 1 and "cover different modules" in cmp.stdout
