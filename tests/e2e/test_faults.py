"""Crash safety on the tiny model: SIGKILL at seeded random moments of every stage (shard writing
included), SIGINT, and a disk that fills up mid-write. Every interrupted job must resume with the
same command to an output folder byte-identical to an uninterrupted run's.

Kills come two ways: the EXL2CONV_FAULT hook (exl2conv/faults.py) at seeded random (point, n)
pairs, chained several per job (kill, resume and kill again, ...), and plain SIGKILLs from
outside after a seeded random delay. The summary test prints how many kills ran and how long the
suite took.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from exl2conv import faults
from exl2conv.cli import main
from tests.tinymodel import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
SEED = 20240606
# -cpi 0: a checkpoint after every module; -ss 0.04 (MB): compile writes three shards
SMALL = ["-b", "4.0", "-ml", "128", "-l", "128", "-cpi", "0", "-ss", "0.04"]
CHAINS = 8            # jobs killed repeatedly by the hook
KILLS_PER_CHAIN = 3
TIMED_KILLS = 4       # SIGKILL from outside after a random delay
MIN_KILLS = 20

LEDGER = {"hook_kills": [], "timed_kills": 0, "sigint": 0, "enospc": 0, "start": time.monotonic()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=1)


def args_for(model: Path, root: Path) -> list[str]:
    return ["-i", str(model), "-o", str(root / "work"), "-cf", str(root / "out"), *SMALL]


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file of the output folder (hidden ones too: a stray temp file must show)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def env_with(fault: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return env


def run_cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exl2conv", *args], env=env_with(fault),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run (in-process), with how often it reaches each fault point."""
    LEDGER["start"] = time.monotonic()  # the suite's clock starts with its first run
    root = tmp_path_factory.mktemp("ref")
    mp = pytest.MonkeyPatch()
    mp.setenv(faults.ENV, ",".join(f"{p}:0" for p in faults.POINTS))  # n = 0: count, never act
    faults.reset()
    try:
        assert main(args_for(tiny, root)) == 0
        counts = dict(faults._counts)
    finally:
        mp.undo()
        faults.reset()
    digest = folder_digest(root / "out")
    assert sum(n.startswith("output-") for n in digest) == 3, digest
    assert all(counts.get(p, 0) > 0 for p in faults.POINTS), counts
    return digest, counts


def assert_clean_finish(root: Path, want: dict[str, str]) -> None:
    assert folder_digest(root / "out") == want
    job = json.loads((root / "work" / "job.json").read_text())
    assert job["progress"] == "finished"
    leftovers = [p.name for p in (root / "work").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert not list((root / "work").glob("states_*.safetensors"))  # the last checkpoint names no file


# the order in which a job first reaches each point: a chain kills at its points in this order,
# so that an early kill leaves the later points still to come
EARLY_FIRST = ("stage_start", "measurement", "module", "checkpoint", "stage", "write", "shard")


def chain_plan(counts: dict[str, int], chain: int) -> list[str]:
    """Seeded kills ``point:n`` for one chain. The chains cycle through the points, so all of them
    are covered; n is drawn from the first half of the point's count in a whole run (a resumed
    process counts from its own start, and each kill only advances the job a little)."""
    rng = random.Random(SEED * 100 + chain)
    points = [faults.POINTS[(chain * KILLS_PER_CHAIN + k) % len(faults.POINTS)] for k in range(KILLS_PER_CHAIN)]
    points.sort(key=EARLY_FIRST.index)
    return [f"{p}:{rng.randint(1, max(1, (counts[p] + 1) // 2))}" for p in points]


@pytest.mark.parametrize("chain", range(CHAINS))
def test_sigkill_chain_resumes_byte_identical(tiny, reference, tmp_path, chain):
    want, counts = reference
    args = args_for(tiny, tmp_path)
    for fault in chain_plan(counts, chain):
        res = run_cli(args, fault)
        if res.returncode == 0:  # the job finished before reaching the point: nothing left to kill
            break
        assert res.returncode == -signal.SIGKILL, (fault, res.stderr[-2000:])
        LEDGER["hook_kills"].append(fault)
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert_clean_finish(tmp_path, want)


def start_cli(args: list[str], root: Path) -> subprocess.Popen:
    log = open(root / "log.txt", "w")
    return subprocess.Popen([sys.executable, "-m", "exl2conv", *args], env=env_with(), stdout=log, stderr=log)


def wait_for_job(proc: subprocess.Popen, work: Path, timeout: float = 120) -> None:
    """Until the job file exists: from then on the converter has its Ctrl-C handling (before, a
    signal would hit the interpreter's start-up, which is not ours to test)."""
    t0 = time.monotonic()
    while not (work / "job.json").exists() and proc.poll() is None:
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.parametrize("case", range(TIMED_KILLS))
def test_sigkill_after_random_delay_resumes(tiny, reference, tmp_path, case):
    want, _ = reference
    args = args_for(tiny, tmp_path)
    rng = random.Random(SEED + 1000 + case)
    proc = start_cli(args, tmp_path)
    wait_for_job(proc, tmp_path / "work")
    time.sleep(rng.uniform(0.0, 6.0))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=600)
    if rc == -signal.SIGKILL:
        LEDGER["timed_kills"] += 1
    else:
        assert rc == 0, (tmp_path / "log.txt").read_text()[-2000:]
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_clean_finish(tmp_path, want)


@pytest.mark.parametrize("fault", ["module:3:sigint", "stage:5:sigint", "write:9:sigint"])
def test_sigint_at_a_hook_stops_cleanly_and_resumes(tiny, reference, tmp_path, fault):
    want, _ = reference
    args = args_for(tiny, tmp_path)
    res = run_cli(args, fault)
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith(" ## ")]
    assert len(errors) == 1 and "resume" in errors[0], errors
    job = json.loads((tmp_path / "work" / "job.json").read_text())
    assert job["progress"] != "finished"
    LEDGER["sigint"] += 1
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_clean_finish(tmp_path, want)


@pytest.mark.parametrize("case", range(3))
def test_sigint_after_random_delay_resumes(tiny, reference, tmp_path, case):
    """Ctrl-C once (a stop at the next safe point) or twice (at once): exit 130 unless the job
    had already finished, no traceback, and the resume gives the same bytes."""
    want, _ = reference
    args = args_for(tiny, tmp_path)
    rng = random.Random(SEED + 2000 + case)
    proc = start_cli(args, tmp_path)
    wait_for_job(proc, tmp_path / "work")
    time.sleep(rng.uniform(0.0, 5.0))
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        if case == 2:  # the impatient user
            time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=600)
    log = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in log, log[-3000:]
    if rc != 0:
        assert rc == 130, log[-2000:]
        LEDGER["sigint"] += 1
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_clean_finish(tmp_path, want)


def check_nothing_corrupt(work: Path) -> None:
    """Every file the job left is whole: JSON parses, safetensors open, no temp files."""
    for p in work.rglob("*"):
        if p.is_dir():
            continue
        assert not p.name.endswith(".tmp"), p
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


@pytest.mark.parametrize("case", range(3))
def test_disk_full_mid_write_is_one_line_and_resumes(tiny, reference, tmp_path, monkeypatch, capsys, case):
    """ENOSPC at a seeded random write (the temp file cut to half, as a full disk leaves it)."""
    want, counts = reference
    args = args_for(tiny, tmp_path)
    n = random.Random(SEED + 3000 + case).randint(1, counts["write"])
    monkeypatch.setenv(faults.ENV, f"write:{n}:enospc")
    faults.reset()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith(" ## ")]
    assert len(errors) == 1 and errors[0].startswith(" ## Error: no space left on the device while writing "), errors
    assert "run the same command" in errors[0] and "Traceback" not in err
    check_nothing_corrupt(tmp_path / "work")
    LEDGER["enospc"] += 1
    monkeypatch.delenv(faults.ENV)
    faults.reset()
    assert main(args) == 0
    assert_clean_finish(tmp_path, want)


def test_fault_spec_is_checked():
    assert faults.parse("write:3,module:2:sigint") == [("write", 3, "kill"), ("module", 2, "sigint")]
    for bad in ("write", "nowhere:1", "write:x", "write:1:explode"):
        with pytest.raises(ValueError):
            faults.parse(bad)


def test_zz_summary(capsys):
    """Runs last (file order): at least MIN_KILLS kills happened, spread over every point."""
    kills = len(LEDGER["hook_kills"]) + LEDGER["timed_kills"]
    points = {f.split(":")[0] for f in LEDGER["hook_kills"]}
    elapsed = time.monotonic() - LEDGER["start"]
    with capsys.disabled():
        print(f"\n fault suite: {kills} SIGKILLs ({len(LEDGER['hook_kills'])} at hook points "
              f"{sorted(points)}, {LEDGER['timed_kills']} after random delays), {LEDGER['sigint']} SIGINT stops, "
              f"{LEDGER['enospc']} disk-full failures, all resumed byte-identical; {elapsed:.0f} s")
    if len(LEDGER["hook_kills"]) == 0:
        pytest.skip("run as part of the whole file")
    assert kills >= MIN_KILLS
    assert points == set(faults.POINTS)
