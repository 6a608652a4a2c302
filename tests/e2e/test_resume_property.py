"""Property: for any combination of the documented convert flags on the tiny model, a job that is
SIGKILLed one to three times (each kill followed by the same command again) and then run once more
to the end gives output byte-identical to an uninterrupted run of that command, and leaves no
temporary files. Output means the -cf folder (every file), the working folder's
output*.safetensors, or with -om the measurement file.

Hypothesis draws the flags (-b -hb -ss -l -ml -r -mr -c -cf -om -m -rs -ra -cpi) and the kills:
(point, n) pairs of the EXL2CONV_FAULT hook (exl2conv/faults.py), n within the number of times an
uninterrupted run of that command reaches the point. The killed runs are subprocesses (the hook
SIGKILLs its own process); the uninterrupted reference runs in-process, once per flag set.

Profiles, chosen with the environment variable HYPOTHESIS_PROFILE:

- ``ci`` (default): CI_EXAMPLES examples, the same ones on every run (derandomized), no shrinking
  (each example costs several conversions, about 8 s); about 3.5 minutes on 2 idle cores.
- ``long``: LONG_EXAMPLES examples (40 minutes or more) from a fresh random seed, a failure
  shrunk to a minimal example: ``HYPOTHESIS_PROFILE=long pytest tests/e2e/test_resume_property.py``

Reproducing a failure: its report ends with a ``replay:`` line, the commands it ran (runnable by
hand) and a ``@reproduce_failure(...)`` blob. In the ci profile, running the file again draws the
same examples; in the long profile, the replay line gives the seed to pass:
``HYPOTHESIS_PROFILE=long pytest tests/e2e/test_resume_property.py --hypothesis-seed=N``
(--hypothesis-seed also replaces the ci profile's fixed draw). The blob, pasted above the test as
a decorator, replays that one example. The summary test prints how many examples ran, how long
they took and how many kills happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from exl2conv import faults
from exl2conv.cli import main
from tests.tinymodel import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
CI_EXAMPLES = 24
LONG_EXAMPLES = 300

settings.register_profile(
    "ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
    # a shrink replays whole kill chains, hundreds of times: a CI failure is reported as drawn
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=LONG_EXAMPLES, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

# Where the tiny model's -b must lie: it can be quantized at 3.637 to 8.509 bits per weight (the
# optimizer's refusal names the range); a margin keeps the draws valid if the overheads move a little.
BITS_CENTI = (375, 825)
# the order in which a job first reaches each point: a chain kills in this order, so that an early
# kill leaves the later points still to come (a resumed process counts from its own start)
EARLY_FIRST = ("stage_start", "measurement", "module", "checkpoint", "stage", "write", "shard")
# placeholders of the path-valued flags, filled in per run (the falsifying example reads better)
CAL, MEAS, CF, OM = "<cal.parquet>", "<measurement.json>", "<out>", "<om.json>"

LEDGER = {"examples": 0, "passed": [], "kills": [], "no_kill": 0, "references": 0, "seed": None, "start": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    LEDGER["start"] = time.monotonic()  # the file's clock starts with its first fixture
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture(scope="module")
def cal(tmp_path_factory):
    """48 rows of random ASCII words, 25 600 bytes: enough tokens (one per byte) for the default
    -r 100 at the longest drawn -l 128."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)

    def text() -> str:
        return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
                        for _ in range(90))

    path = tmp_path_factory.mktemp("cal") / "cal.parquet"
    pq.write_table(pa.table({"text": [text() for _ in range(48)]}), str(path))
    assert sum(len(t) for t in pq.read_table(str(path)).column("text").to_pylist()) >= 100 * 128
    return path


@pytest.fixture(scope="module")
def measurement(tiny, tmp_path_factory):
    """A measurement of the tiny model (built-in set), for -m."""
    root = tmp_path_factory.mktemp("meas")
    path = root / "measurement.json"
    assert main(["-i", str(tiny), "-o", str(root / "work"), "-om", str(path), "-ml", "128", "-l", "128"]) == 0
    return path


class Inputs:
    """The module's files and a maker of fresh folders, in one argument of short repr (hypothesis
    prints every argument of a falsifying example)."""

    def __init__(self, model: Path, cal: Path, measurement: Path, tmp_path_factory):
        self.model, self.paths, self.factory = model, {CAL: cal, MEAS: measurement}, tmp_path_factory

    def folder(self, name: str) -> Path:
        return self.factory.mktemp(name)

    def __repr__(self) -> str:
        return f"Inputs({self.model.parent.parent})"


@pytest.fixture(scope="module")
def inputs(tiny, cal, measurement, tmp_path_factory):
    return Inputs(tiny, cal, measurement, tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def replay_seed(request):
    """The seed of the run, known so that a failure can be replayed: --hypothesis-seed if given
    (in the ci profile too, which is otherwise derandomized), else a fresh one in the long profile."""
    given_seed = request.config.getoption("--hypothesis-seed", None)
    n = int(given_seed) if given_seed is not None else (
        None if settings.get_profile(PROFILE).derandomize else random.randrange(2 ** 32))
    if n is not None:
        seed(n)(test_killed_and_resumed_matches_uninterrupted)
    LEDGER["seed"] = n


# -- the flags ------------------------------------------------------------------------------------


def maybe(strategy):
    return st.none() | strategy


@st.composite
def convert_flags(draw) -> str:
    """A flag combination the CLI accepts: argv without -i and -o, as one line (path-valued flags
    as placeholders).

    -l and -ml are always given: the defaults (2048) would make each conversion take minutes. The
    built-in set needs multiples of 128; a parquet file takes any length. -om is never drawn with
    -cf (refused by design) nor with -m (which skips the measurement -om would save). -cpi is 0 or
    left at its default: an interval in seconds between 0 and a whole run would checkpoint at
    moments that depend on the machine's speed, so that a seed would not replay the same kills."""
    flags: list[str] = []

    def add(flag, value):
        if value is not None:
            flags.extend([flag, str(value)])

    parquet = draw(st.booleans())
    om = draw(st.booleans())
    cf = not om and draw(st.booleans())
    reuse = not om and draw(st.booleans())
    add("-c", CAL if parquet else None)
    add("-om", OM if om else None)
    add("-cf", CF if cf else None)
    add("-m", MEAS if reuse else None)
    add("-b", draw(maybe(st.integers(*BITS_CENTI).map(lambda c: c / 100))))
    add("-hb", draw(maybe(st.sampled_from([2, 3, 4, 5, 6, 8]))))
    # 0.04 MB (three shards) is the smallest: below the embedding's size -ss is refused by design
    add("-ss", draw(maybe(st.sampled_from([0.0, 0.04, 0.1, 1.0]))))
    lengths = st.integers(32, 128) if parquet else st.sampled_from([128, 256])
    add("-l", draw(lengths))
    add("-ml", draw(lengths))
    add("-r", draw(maybe(st.integers(1, 24))))
    add("-mr", draw(maybe(st.integers(1, 24))))
    add("-rs", draw(maybe(st.integers(4, 16).map(lambda q: q / 4))))
    add("-ra", draw(maybe(st.integers(4, 16).map(lambda q: q / 4))))
    add("-cpi", draw(maybe(st.just(0.0))))
    return " ".join(flags)


def command(inputs: Inputs, flags: str, root: Path) -> list[str]:
    fill = {**inputs.paths, CF: str(root / "out"), OM: str(root / "om.json")}
    return ["-i", str(inputs.model), "-o", str(root / "work"), *(str(fill.get(f, f)) for f in flags.split())]


# -- runs -----------------------------------------------------------------------------------------


def outcome(flags: str, root: Path) -> dict[str, str]:
    """sha256 of every output file by name: the -om file, every file of the -cf folder (hidden ones
    too: a stray temp file must show), or the working folder's output*.safetensors."""
    if OM in flags.split():
        files = [root / "om.json"]
    elif CF in flags.split():
        files = sorted((root / "out").iterdir())
    else:
        files = sorted((root / "work").glob("output*.safetensors"))
    assert files, f"no output in {root}"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


REFERENCES: dict[str, tuple[dict[str, str], dict[str, int]]] = {}


def reference(inputs: Inputs, flags: str) -> tuple[dict[str, str], dict[str, int]]:
    """The uninterrupted run's outcome and how often it reaches each fault point (``point:0``
    counts without acting), cached by flags: hypothesis draws the same flags again while it
    explores the kills."""
    if flags in REFERENCES:
        return REFERENCES[flags]
    root = inputs.folder("ref")
    saved = os.environ.get(faults.ENV)
    os.environ[faults.ENV] = ",".join(f"{p}:0" for p in faults.POINTS)
    faults.reset()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(command(inputs, flags, root))
        counts = dict(faults._counts)
    finally:
        if saved is None:
            os.environ.pop(faults.ENV, None)
        else:
            os.environ[faults.ENV] = saved
        faults.reset()
    assert rc == 0, f"the uninterrupted run failed (rc {rc}): {err.getvalue()[-2000:]}"
    LEDGER["references"] += 1
    REFERENCES[flags] = outcome(flags, root), counts
    return REFERENCES[flags]


def run_cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return subprocess.run([sys.executable, "-m", "exl2conv", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def kill_plans(counts: dict[str, int]):
    """One to three kills ``point:n``, n within the reference's count of the point."""
    def order(point: str) -> int:
        return EARLY_FIRST.index(point) if point in EARLY_FIRST else len(EARLY_FIRST)

    reached = sorted((p for p in faults.POINTS if counts.get(p, 0) > 0), key=order)
    one = st.sampled_from(reached).flatmap(lambda p: st.integers(1, counts[p]).map(lambda n: f"{p}:{n}"))
    return st.lists(one, min_size=1, max_size=3).map(lambda plan: sorted(plan, key=lambda f: order(f.split(":")[0])))


def shell_line(args: list[str], fault: str | None = None) -> str:
    prefix = f"{faults.ENV}={fault} " if fault else ""
    return f"{prefix}PYTHONPATH={REPO} {shlex.quote(sys.executable)} -m exl2conv {shlex.join(args)}"


def replay_line() -> str:
    test = Path(__file__).relative_to(REPO)
    if LEDGER["seed"] is None:
        return f"pytest {test} (the {PROFILE} profile draws the same examples on every run)"
    return f"HYPOTHESIS_PROFILE={PROFILE} pytest {test} --hypothesis-seed={LEDGER['seed']}"


def failure(res: subprocess.CompletedProcess) -> str:
    return f"rc {res.returncode}: {res.stderr[-2000:]}"


# -- the property ---------------------------------------------------------------------------------


@settings(settings.get_profile(PROFILE))
@given(flags=convert_flags(), data=st.data())
def test_killed_and_resumed_matches_uninterrupted(inputs, flags, data):
    t0 = time.monotonic()
    want, counts = reference(inputs, flags)
    plan = data.draw(kill_plans(counts), label="kills")
    root = inputs.folder("run")
    args = command(inputs, flags, root)
    note(f"replay: {replay_line()}")
    note("commands:\n  " + "\n  ".join([shell_line(args, f) for f in plan] + [shell_line(args)]))
    LEDGER["examples"] += 1
    killed = 0
    for fault in plan:
        res = run_cli(args, fault)
        if res.returncode == 0:  # the job finished before reaching the point: nothing left to kill
            break
        assert res.returncode == -signal.SIGKILL, f"{fault}: {failure(res)}"
        LEDGER["kills"].append(fault)
        killed += 1
    if killed == 0:
        LEDGER["no_kill"] += 1
    res = run_cli(args)
    assert res.returncode == 0, f"the resumed run after {killed} kill(s): {failure(res)}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert outcome(flags, root) == want
    job = json.loads((root / "work" / "job.json").read_text())
    assert job["progress"] == "finished"
    leftovers = [str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    LEDGER["passed"].append(time.monotonic() - t0)


def test_zz_summary(capsys):
    """Runs last (file order): how many examples and kills the property ran, and how long."""
    start, passed = LEDGER["start"], sorted(LEDGER["passed"])
    elapsed = time.monotonic() - start if start is not None else 0.0
    points = sorted({f.split(":")[0] for f in LEDGER["kills"]})
    seed_text = f"seed {LEDGER['seed']}" if LEDGER["seed"] is not None else "derandomized"
    each = f", {passed[len(passed) // 2]:.1f} s median, {passed[-1]:.1f} s longest" if passed else ""
    with capsys.disabled():
        print(f"\n resume property ({PROFILE} profile, {seed_text}): {LEDGER['examples']} examples run "
              f"({LEDGER['references']} distinct flag sets), {len(passed)} passed{each}; "
              f"{len(LEDGER['kills'])} SIGKILLs at points {points}, {LEDGER['no_kill']} examples finished "
              f"before their first kill point; {elapsed:.0f} s in all")
    if LEDGER["examples"] == 0:
        pytest.skip("run as part of the whole file")
