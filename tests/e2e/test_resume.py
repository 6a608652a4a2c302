"""Resume never refuses its own job: the command a user runs again after an interruption resumes
it to the bytes of an uninterrupted run.

- -r / -mr on the built-in calibration set: the set fixes its own row counts, the job keeps the
  command's values apart from them, and a killed job resumes (the bug this file was written for).
- Settings outside the command line (EXL2CONV_*): an output setting changed between runs is
  refused with the difference named; a speed setting changes no byte.
- One process per working folder: a second is refused with the holder named; a killed holder
  leaves nothing that blocks the resume.
- Ctrl-C in every stage stops at the stage's first safe point, not at its end.
- A -b that no choice of options can meet is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exl2conv import __version__, atomic, faults
from exl2conv.cli import main
from exl2conv.job import Stage
from exl2conv.worklock import WorkLock
from tests.tinymodel import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
# The issue's command, at the tiny model's scale: the built-in set with -r and -mr given
BUILTIN_WITH_ROWS = ["-b", "4.0", "-ml", "128", "-mr", "4", "-l", "128", "-r", "8", "-cpi", "0"]
SPEED_SETTINGS = {"EXL2CONV_READ_AHEAD": "0", "EXL2CONV_FUSED_KERNELS": "0", "EXL2CONV_NO_KERNELS": "1",
                  "EXL2CONV_STATES": "host"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=1)


def command(model: Path, root: Path, extra: list[str]) -> list[str]:
    return ["-i", str(model), "-o", str(root / "work"), "-cf", str(root / "out"), *extra]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO))
    full.pop(faults.ENV, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "exl2conv", *args], env=full, capture_output=True, text=True,
                          timeout=600)


def ctrl_c_in_process(args: list[str], fault: str, monkeypatch) -> None:
    """Run ``args`` in this process with a SIGINT fault (the hook signals this process, whose
    handler asks the conversion to stop): it must exit with 130."""
    monkeypatch.setenv(faults.ENV, fault)
    faults.reset()
    try:
        assert main(args) == 130
    finally:
        faults.reset()
    monkeypatch.delenv(faults.ENV)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(" ## ")]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The issue's command run once, uninterrupted, in-process."""
    root = tmp_path_factory.mktemp("ref")
    assert main(command(tiny, root, BUILTIN_WITH_ROWS)) == 0
    return root


@pytest.mark.parametrize("kill", ["module:2", "module:5", "measurement:3", "checkpoint:7", "stage:6"])
def test_the_issue_command_killed_and_rerun_resumes_to_the_same_bytes(tiny, reference, tmp_path, kill):
    """-ml 128 -mr 4 -l 128 -r 8 on the built-in set, SIGKILLed in the measurement (or later),
    then the very same command: it used to be refused with "-mr: saved 19, given 4"."""
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    killed = run_cli(args, {faults.ENV: kill})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming job" in resumed.stdout
    assert digest(tmp_path / "out") == digest(reference / "out")


def test_a_kill_during_the_first_save_of_the_job_resumes(tiny, reference, tmp_path):
    """SIGKILL between writing the first job.json and renaming it into place leaves a folder with
    the lock and a temporary file: ours, so the same command starts the job there (property test
    example: write:1 twice)."""
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    assert run_cli(args, {faults.ENV: "write:1"}).returncode == -signal.SIGKILL
    left = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert "job.json" not in left and any(atomic.is_temp_name(name) for name in left), left
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digest(tmp_path / "out") == digest(reference / "out")


def test_a_kill_during_the_last_save_leaves_nothing_behind(tiny, reference, tmp_path, monkeypatch):
    """SIGKILL in the job's very last write (its temporary file not yet renamed): the rerun
    removes the temporary file and records every stage's time (the time of the last stage used to
    be saved after 'finished', in a save of its own that a kill could cut)."""
    monkeypatch.setenv(faults.ENV, "write:0")  # in-process: counts the writes, never acts
    faults.reset()
    try:
        assert main(command(tiny, tmp_path / "count", BUILTIN_WITH_ROWS)) == 0
        last = faults._counts["write"]
    finally:
        faults.reset()
    monkeypatch.delenv(faults.ENV)
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    assert run_cli(args, {faults.ENV: f"write:{last}"}).returncode == -signal.SIGKILL
    assert any(atomic.is_temp_name(p.name) for p in (tmp_path / "work").iterdir())
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not any(atomic.is_temp_name(p.name) for p in (tmp_path / "work").iterdir())
    assert digest(tmp_path / "out") == digest(reference / "out")
    times = json.loads((tmp_path / "work" / "job.json").read_text())["times"]
    assert set(times) == {s.value for s in Stage if s != Stage.FINISHED}, times


def test_the_job_keeps_the_command_apart_from_the_built_in_sets_rows(reference):
    job = json.loads((reference / "work" / "job.json").read_text())
    assert job["measurement_rows"] == 4 and job["dataset_rows"] == 8  # what the command said
    assert job["calibration_rows"] == {"measure": 19, "quant": 115}  # what the built-in set made
    config = json.loads((reference / "out" / "config.json").read_text())
    assert config["quantization_config"]["calibration"]["rows"] == 115  # as ExLlamaV2 writes it
    doc = json.loads((reference / "work" / "measurement.json").read_text())
    assert doc["exl2conv"]["calibration"]["measurement_rows"] == 19


def test_rows_flags_change_nothing_on_the_built_in_set(tiny, reference, tmp_path, capsys):
    """-r / -mr do not apply to the built-in set: leaving them out gives the same bytes and the same
    printed calibration perplexity (which used to be taken on the first -mr rows)."""

    def perplexity_line() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if "calibration perplexity" in line]

    capsys.readouterr()
    assert main(command(tiny, tmp_path, ["-b", "4.0", "-ml", "128", "-l", "128", "-cpi", "0"])) == 0
    printed = perplexity_line()
    assert digest(tmp_path / "out") == digest(reference / "out")
    assert main(command(tiny, reference, BUILTIN_WITH_ROWS)) == 0  # finished: reprints its summary
    assert perplexity_line() == printed
    assert "(quantized, first 19 rows x 128 tokens of the quantization set)" in printed[0]


# -- settings -----------------------------------------------------------------------------------------


def test_a_changed_output_setting_is_refused_with_the_difference_named(tiny, reference, tmp_path):
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    assert run_cli(args, {faults.ENV: "module:3"}).returncode == -signal.SIGKILL
    refused = run_cli(args, {"EXL2CONV_NO_TWEAK": "1", "EXL2CONV_OBJECTIVE": "error"})
    assert refused.returncode == 1
    [line] = error_lines(refused.stderr)
    assert "norm tweaking (EXL2CONV_NO_TWEAK): saved True, now False" in line
    assert "solver objective (EXL2CONV_OBJECTIVE): saved 'kl', now 'error'" in line
    assert "-nr" in line and "Traceback" not in refused.stderr
    resumed = run_cli(args)  # the settings it started with
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digest(tmp_path / "out") == digest(reference / "out")


def test_another_exl2conv_version_is_refused(tiny, tmp_path, monkeypatch, capsys):
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    ctrl_c_in_process(args, "stage_start:3:sigint", monkeypatch)  # a job to resume
    job_file = tmp_path / "work" / "job.json"
    job = json.loads(job_file.read_text())
    job["settings"]["version"] = "0.1.0"
    job_file.write_text(json.dumps(job))
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"exl2conv version: saved '0.1.0', now '{__version__}'" in err and len(error_lines(err)) == 1


def test_speed_settings_resume_and_give_the_same_bytes(tiny, reference, tmp_path):
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    assert run_cli(args, {faults.ENV: "module:4"}).returncode == -signal.SIGKILL
    resumed = run_cli(args, SPEED_SETTINGS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digest(tmp_path / "out") == digest(reference / "out")


def test_speed_settings_give_the_same_bytes_from_the_start(tiny, reference, tmp_path, monkeypatch):
    for name, value in SPEED_SETTINGS.items():
        monkeypatch.setenv(name, value)
    assert main(command(tiny, tmp_path, BUILTIN_WITH_ROWS)) == 0
    assert digest(tmp_path / "out") == digest(reference / "out")


@pytest.mark.parametrize("name,value", [("EXL2CONV_NO_TWEAK", "yes"), ("EXL2CONV_OBJECTIVE", "loss"),
                                        ("EXL2CONV_STATES", "disk"), ("EXL2CONV_READ_AHEAD", "off")])
def test_a_bad_setting_is_refused_before_any_work(tiny, tmp_path, monkeypatch, capsys, name, value):
    monkeypatch.setenv(name, value)
    assert main(command(tiny, tmp_path, BUILTIN_WITH_ROWS)) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f" ## Error: {name}={value}: give ")
    assert not (tmp_path / "work").exists()


# -- one process per folder ---------------------------------------------------------------------------


HOLDER = """
import sys, time
from exl2conv.worklock import WorkLock
WorkLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_and_a_killed_one_blocks_nothing(tiny, reference, tmp_path, capsys):
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    assert run_cli(args, {faults.ENV: "module:3"}).returncode == -signal.SIGKILL
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "work")], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(args) == 1
        [line] = error_lines(capsys.readouterr().err)
        assert f"another exl2conv process is running the job in {tmp_path / 'work'} (pid {holder.pid} on " in line
        assert ", since 20" in line
        assert json.loads((tmp_path / "work" / "job.json").read_text())["progress"] == "measure_quant"
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the lock does not
        holder.wait()
    assert (tmp_path / "work" / "job.lock").exists()
    assert main(args) == 0
    assert digest(tmp_path / "out") == digest(reference / "out")


def test_the_lock_is_per_folder_and_released_at_the_end(tiny, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with WorkLock(work):
        with pytest.raises(Exception, match="another exl2conv process"):
            WorkLock(work).acquire()
        WorkLock(tmp_path).acquire().release()  # another folder
    WorkLock(work).acquire().release()  # released


def test_nr_keeps_the_lock_and_a_folder_holding_only_a_lock_is_ours(tiny, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    WorkLock(work).acquire().release()  # what a process killed before its first save leaves
    assert main(["-i", str(tiny), "-o", str(work), "-om", str(tmp_path / "m.json"), "-ml", "128"]) == 0
    assert main(["-i", str(tiny), "-o", str(work), "-om", str(tmp_path / "m.json"), "-ml", "128", "-nr"]) == 0
    assert (work / "job.lock").exists() and (work / "job.json").exists()


# -- Ctrl-C in every stage ----------------------------------------------------------------------------


STAGES = [s.value for s in Stage if s != Stage.FINISHED]
# stages with safe points inside: Ctrl-C at their start leaves them unfinished (the others take
# moments, and end before the stop is seen)
STOPPED_INSIDE = {"sensitivity", "measure_quant", "quant", "compile"}


@pytest.mark.parametrize("n", range(1, len(STAGES) + 1), ids=STAGES)
def test_ctrl_c_stops_at_the_stages_first_safe_point(tiny, reference, tmp_path, monkeypatch, capsys, n):
    """SIGINT at the start of the n-th stage (the fault hook sends it to this process, whose
    handler asks for a stop): exit 130 with one line, the job not past that stage (or the next,
    for the short stages), no module finished in the passes, and the resume gives the same bytes."""
    args = command(tiny, tmp_path, BUILTIN_WITH_ROWS)
    stage = STAGES[n - 1]
    ctrl_c_in_process(args, f"stage_start:{n}:sigint", monkeypatch)
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "run the same command to resume" in lines[0], lines
    job = json.loads((tmp_path / "work" / "job.json").read_text())
    allowed = {stage} if stage in STOPPED_INSIDE else {stage, STAGES[n]}
    assert job["progress"] in allowed, (stage, job["progress"])
    if stage in ("measure_quant", "quant"):
        assert job["checkpoint"]["module"] == 0  # no module was finished after the Ctrl-C
    assert main(args) == 0
    assert digest(tmp_path / "out") == digest(reference / "out")


# -- -b before any work ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ["1.0", "9.5"])
def test_unreachable_bits_are_refused_before_any_work(tiny, tmp_path, capsys, bits):
    assert main(command(tiny, tmp_path, ["-b", bits, "-ml", "128", "-l", "128"])) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f" ## Error: -b {bits}: this model can be quantized at 3.637 to 8.509 bits per weight")
    assert not (tmp_path / "work" / "cal_measure.safetensors").exists()  # not even the tokenization ran
    # the same folder then takes a reachable -b: it may change until the optimizer has run
    assert main(command(tiny, tmp_path, ["-b", "4.0", "-ml", "128", "-l", "128"])) == 0
