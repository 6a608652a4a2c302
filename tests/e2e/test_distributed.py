"""A job on several CPU processes (gloo), against the same job in one process: -d cpu,cpu and
cpu,cpu,cpu, two "hosts" under torchrun on the loopback address, and a rank SIGKILLed mid-job.

The measurement divides whole candidates and whole table rows among the ranks and every one is
computed exactly as one process computes it (docs/distributed.md), so every world size gives one
process's bytes: measurement.json, the solver's choice and the output. Equal bytes to one
reference also make every run of one world size give the same bytes as every other."""

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


def test_two_processes_give_one_processs_bytes(tiny, reference, tmp_path):
    done = run_cli([*full(tiny, tmp_path), "-d", "cpu,cpu"], ONLY_RANK_0_WRITES)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sha(tmp_path / "work" / "measurement.json") == sha(reference / "work" / "measurement.json")
    jobs = [json.loads((root / "work" / "job.json").read_text()) for root in (tmp_path, reference)]
    for field in ("strategy", "solver", "quant_log"):
        assert jobs[0][field] == jobs[1][field]
    for name in ("output.safetensors", "config.json"):
        assert sha(tmp_path / "out" / name) == sha(reference / "out" / name)
    # rank 0 alone writes (ONLY_RANK_0_WRITES), and only what one process writes
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == \
        sorted(p.name for p in (reference / "work").iterdir())
    assert "== Finished" in done.stdout


def test_three_processes_measure_one_processs_bytes(tiny, reference, tmp_path):
    done = run_cli([*measure_only(tiny, tmp_path), "-d", "cpu,cpu,cpu", "-dr", "1,2,1"], ONLY_RANK_0_WRITES)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sha(tmp_path / "m.json") == sha(reference / "work" / "measurement.json")


def test_two_hosts_under_torchrun_measure_one_processs_bytes(tiny, reference, tmp_path):
    port = str(launch.free_port())
    hosts = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               "-m", "exl2conv", *measure_only(tiny, tmp_path)],
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    outs = [h.communicate(timeout=300) for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0], [o[1][-2000:] for o in outs]
    assert sha(tmp_path / "m.json") == sha(reference / "work" / "measurement.json")


# rank 0 (the writer) SIGKILLed at the measurement's first module, before its checkpoint of it;
# rank 1 after its first module of the quantization pass (rank 0 saves that module, then loses rank 1
# in the next one's gather), and the job resumed on 3 processes
KILLS = [(0, "module:1", "cpu,cpu", ("measure_quant", 0)), (1, "module:5", "cpu,cpu,cpu", ("quant", 1))]


@pytest.mark.parametrize("rank, fault, resume_on, saved", KILLS)
def test_a_killed_rank_stops_every_rank_with_one_line_and_the_command_resumes(tiny, reference, tmp_path, rank,
                                                                               fault, resume_on, saved):
    """The launcher stops every rank within seconds, one line names the killed rank, and the same
    command (with the same or another number of devices) resumes from rank 0's checkpoint to
    one process's bytes."""
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
    assert sha(tmp_path / "work" / "measurement.json") == sha(reference / "work" / "measurement.json")
    if saved[0] == "quant":
        assert sha(tmp_path / "out" / "output.safetensors") == sha(reference / "out" / "output.safetensors")


@pytest.mark.parametrize("fault, who", [("module:1:enospc@1", "rank 1 of 2"), ("module:1:enospc", "rank 0 of 2")])
def test_a_failed_rank_is_named_in_one_line(tiny, tmp_path, fault, who):
    """An error in one rank other than 0 is said by it (the launcher shows its kept stderr); an
    error every rank meets alike is said once, by rank 0."""
    failed = run_cli([*measure_only(tiny, tmp_path), "-d", "cpu,cpu"], {faults.ENV: fault})
    assert failed.returncode == 1
    lines = error_lines(failed.stderr)
    assert len(lines) == 1 and lines[0].startswith(f" ## Error ({who}): OSError: [Errno 28]"), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
