"""A job on several CPU processes (gloo), against the same job in one process: -d cpu,cpu and
cpu,cpu,cpu, two "hosts" under torchrun on the loopback address, and a rank SIGKILLed mid-job.

Each rank holds and runs only its share of the calibration rows, and the sums over rows
(Hessians, the perplexity) are added over the ranks in rank order (docs/distributed.md): so every
run of one world size gives the same bytes (here: torchrun's 2 ranks and a job killed and resumed
on 2 processes give the 2-process job's bytes), and against one process the measurement agrees
within float noise, the solver makes the same choice and the decoded model's KL is within 1 %.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exl2conv import faults, launch
from exl2conv.cli import main
from tests.tinymodel import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
ROWS = ["-b", "4.0", "-ml", "128", "-mr", "4", "-l", "128", "-r", "8", "-cpi", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # one layer: an attention and an MLP module, each measured on its whole option table
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=1, layers=1)


def full(model: Path, root: Path) -> list[str]:
    return ["-i", str(model), "-o", str(root / "work"), "-cf", str(root / "out"), *ROWS]


def measure_only(model: Path, root: Path) -> list[str]:
    return ["-i", str(model), "-o", str(root / "work"), "-om", str(root / "m.json"), *ROWS]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def env() -> dict[str, str]:
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.pop(faults.ENV, None)
    return full_env


def run_cli(args: list[str], extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exl2conv", *args], env={**env(), **(extra or {})},
                          capture_output=True, text=True, timeout=300)


# Any file a rank other than 0 writes (every write goes through exl2conv.atomic's fault point)
# kills it, and with it the job.
ONLY_RANK_0_WRITES = {faults.ENV: "write:1:kill@1,write:1:kill@2"}


def error_lines(stderr: str) -> list[str]:
    """Every " ## " message, also one written after an unfinished progress bar."""
    return re.findall(r" ## [^\r\n]*", stderr)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The job in one process (today's path), in-process."""
    root = tmp_path_factory.mktemp("one")
    assert main(full(tiny, root)) == 0
    return root


@pytest.fixture(scope="module")
def two(tiny, tmp_path_factory):
    """The job on 2 processes; rank 0 alone writes (ONLY_RANK_0_WRITES)."""
    root = tmp_path_factory.mktemp("two")
    done = run_cli([*full(tiny, root), "-d", "cpu,cpu"], ONLY_RANK_0_WRITES)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== Finished" in done.stdout
    return root


def measurement_difference(got: Path, want: Path) -> tuple[float, float]:
    """The largest absolute difference of two measurements' accuracies and the largest relative
    difference of their predicted KL; everything else (keys, bits, settings) must be equal."""
    worst = [0.0, 0.0]

    def walk(a, b, key=""):
        assert type(a) is type(b), key
        if isinstance(a, dict):
            assert a.keys() == b.keys(), key
            for k in a:
                walk(a[k], b[k], k)
        elif isinstance(a, list):
            assert len(a) == len(b), key
            for x, y in zip(a, b):
                walk(x, y, key)
        elif isinstance(a, float) and key != "bpw":
            relative = key != "accuracy"
            diff = abs(a - b) / (abs(b) if relative and b else 1.0)
            worst[relative] = max(worst[relative], diff)
        else:
            assert a == b, key

    walk(json.loads(got.read_text()), json.loads(want.read_text()))
    return worst[0], worst[1]


def decoded_kl(model: Path, out: Path) -> float:
    """The decoded model's mean KL against the source model on two random windows."""
    import torch

    from exl2conv.evaluate import evaluate

    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    return evaluate(out, model, ids, "cpu")["kl"]


def test_two_processes_agree_with_one_process(tiny, reference, two):
    accuracy, predicted = measurement_difference(two / "work" / "measurement.json",
                                                 reference / "work" / "measurement.json")
    print(f"\n2 processes vs 1: largest accuracy difference {accuracy:.3g}, predicted KL {predicted:.3g} (relative)")
    assert accuracy < 1e-4 and predicted < 1e-3
    jobs = [json.loads((root / "work" / "job.json").read_text()) for root in (two, reference)]
    assert jobs[0]["strategy"] == jobs[1]["strategy"]  # the solver's choice
    assert [r.get("linears") for r in jobs[0]["quant_log"]] == [r.get("linears") for r in jobs[1]["quant_log"]]
    rfn = [(a.get("rfn_error"), b.get("rfn_error")) for a, b in zip(jobs[0]["quant_log"], jobs[1]["quant_log"])]
    assert all(abs(a - b) <= 1e-3 * b for a, b in rfn if b is not None), rfn
    kls = [decoded_kl(tiny, root / "out") for root in (two, reference)]
    print(f"decoded KL: 2 processes {kls[0]:.6g}, 1 process {kls[1]:.6g}")
    assert abs(kls[0] - kls[1]) <= 0.01 * kls[1]
    assert sha(two / "out" / "config.json") == sha(reference / "out" / "config.json")
    # rank 0 alone writes (ONLY_RANK_0_WRITES), and only what one process writes
    assert sorted(p.name for p in (two / "work").iterdir()) == sorted(p.name for p in (reference / "work").iterdir())


def test_three_processes_measure_as_one_process(tiny, reference, tmp_path):
    done = run_cli([*measure_only(tiny, tmp_path), "-d", "cpu,cpu,cpu", "-dr", "1,2,1"], ONLY_RANK_0_WRITES)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy, predicted = measurement_difference(tmp_path / "m.json", reference / "work" / "measurement.json")
    print(f"\n3 processes vs 1: largest accuracy difference {accuracy:.3g}, predicted KL {predicted:.3g} (relative)")
    assert accuracy < 1e-4 and predicted < 1e-3


def test_two_hosts_under_torchrun_measure_two_processes_bytes(tiny, two, tmp_path):
    port = str(launch.free_port())
    hosts = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               "-m", "exl2conv", *measure_only(tiny, tmp_path)],
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    outs = [h.communicate(timeout=300) for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0], [o[1][-2000:] for o in outs]
    assert sha(tmp_path / "m.json") == sha(two / "work" / "measurement.json")  # 2 ranks, whatever launched them


# rank 0 (the writer) SIGKILLed at the measurement's first module, before its checkpoint of it, and
# the job resumed on 3 processes; rank 1 after the quantization pass's second module (rank 0 loses it
# in the checkpoint's gather of that module's rows: the checkpoint of the first is the last saved),
# and the job resumed on 2 processes: the 2-process job's bytes
KILLS = [(0, "module:1", "cpu,cpu,cpu", ("measure_quant", 0)), (1, "module:6", "cpu,cpu", ("quant", 1))]


@pytest.mark.parametrize("rank, fault, resume_on, saved", KILLS)
def test_a_killed_rank_stops_every_rank_with_one_line_and_the_command_resumes(tiny, reference, two, tmp_path, rank,
                                                                               fault, resume_on, saved):
    """The launcher stops every rank within seconds, one line names the killed rank, and the same
    command (with the same or another number of devices) resumes from rank 0's checkpoint: on as
    many processes, to their bytes; on another number, within float noise of one process."""
    args = measure_only(tiny, tmp_path) if saved[0] == "measure_quant" else full(tiny, tmp_path)
    t0 = time.monotonic()
    killed = run_cli([*args, "-d", "cpu,cpu"], {faults.ENV: f"{fault}:kill@{rank}"})
    assert time.monotonic() - t0 < 60
    assert killed.returncode == 1
    assert error_lines(killed.stderr) == [
        f" ## Error: rank {rank} (cpu) was killed by SIGKILL; the other ranks were stopped and the job's last "
        "checkpoint is kept: run the same command to resume"], killed.stderr[-3000:]
    assert "Traceback" not in killed.stderr
    job = json.loads((tmp_path / "work" / "job.json").read_text())
    assert (job["progress"], job["checkpoint"]["module"]) == saved
    resumed = run_cli([*args, "-d", resume_on], ONLY_RANK_0_WRITES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming job" in resumed.stdout
    if saved[0] == "quant":
        for name in ("work/measurement.json", "out/output.safetensors"):
            assert sha(tmp_path / name) == sha(two / name)
    else:
        accuracy, _ = measurement_difference(tmp_path / "work" / "measurement.json",
                                             reference / "work" / "measurement.json")
        assert accuracy < 1e-4


@pytest.mark.parametrize("fault, who", [("module:1:enospc@1", "rank 1 of 2"), ("module:1:enospc", "rank 0 of 2")])
def test_a_failed_rank_is_named_in_one_line(tiny, tmp_path, fault, who):
    """An error in one rank other than 0 is said by it (the launcher shows its kept stderr); an
    error every rank meets alike is said once, by rank 0."""
    failed = run_cli([*measure_only(tiny, tmp_path), "-d", "cpu,cpu"], {faults.ENV: fault})
    assert failed.returncode == 1
    lines = error_lines(failed.stderr)
    assert len(lines) == 1 and lines[0].startswith(f" ## Error ({who}): OSError: [Errno 28]"), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
