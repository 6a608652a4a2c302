"""Starting and ending the processes of a job on several devices (docs/distributed.md).

- ``-d 0,1`` (CUDA device numbers) or ``-d cpu,cpu`` (CPU processes, for tests and CI), with
  ``-dr`` ratios: :func:`parse_devices` checks them, one line per mistake.
- The command with several devices is the launcher (:func:`spawn`): it starts one process per
  device, the same command with torch.distributed's variables set (a process group on the
  loopback address), and watches them: the first to fail stops the others, and the launcher
  exits with one line and that rank's status.
- A process started so, or by torchrun, is a rank (:func:`rank_plan`, :func:`run_rank`): any
  error ends it with one line naming the rank, and a non-zero exit, no traceback, no hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from exl2conv import distributed, settings
from exl2conv.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER, Exl2Error, Interrupted

CPU = "cpu"
# After a rank fails, the others get this long to notice (a closed connection ends their
# collective at once) before the launcher kills them.
GRACE_S = 10.0
POLL_S = 0.1


@dataclass(frozen=True)
class Devices:
    """-d and -dr, checked: ``names`` torch device names ("cuda:0", "cpu"), ``ratios`` one per rank."""
    names: tuple[str, ...]  # empty: torchrun without -d (each rank picks by its local rank)
    ratios: tuple[float, ...]


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(devices: str | None, device: str | None, cuda_count: int | None = None) -> tuple[str, ...] | None:
    """-d's devices as torch device names (None without -d); :class:`Exl2Error` on a bad value."""
    if devices is None:
        return None
    if device is not None:
        raise Exl2Error(f"-d {devices} and --device {device}: give one of them")
    count = _cuda_count() if cuda_count is None else cuda_count
    names = []
    for entry in (e.strip() for e in devices.split(",")):
        if entry == CPU:
            names.append(CPU)
        elif entry.isdigit():
            if int(entry) >= count:
                have = f"its CUDA devices are 0-{count - 1}" if count else "it has no CUDA device"
                raise Exl2Error(f"-d {devices}: CUDA device {entry} is not on this machine ({have})")
            names.append(f"cuda:{int(entry)}")
        else:
            raise Exl2Error(f"-d {devices}: {entry!r} is not a device; give CUDA device numbers (-d 0,1) or "
                            "cpu for CPU processes (-d cpu,cpu)")
    cuda = [n for n in names if n != CPU]
    if len(set(cuda)) != len(cuda):
        raise Exl2Error(f"-d {devices}: a CUDA device is given twice; give each once (one process per device)")
    if cuda and len(cuda) != len(names):
        raise Exl2Error(f"-d {devices}: mixes CUDA devices and cpu; give CUDA devices only, or cpu only")
    return tuple(names)


def plan(devices: str | None, ratios: str | None, device: str | None,
         env: settings.RankEnvironment | None) -> Devices | None:
    """The devices and ratios of this command: None for one process on today's path (no -d and no
    torchrun, or -d with one device: see :func:`single_device`). ``env``: this process's rank,
    when torchrun or the launcher started it; -dr then gives one ratio per rank of the job."""
    names = parse_devices(devices, device)
    ranks = env.world_size if env is not None else len(names or ())
    if ratios is not None and names is None and env is None:
        raise Exl2Error(f"-dr {ratios}: device ratios need -d (the devices they apply to) or torchrun")
    if ranks <= 1 and names is None:
        return None
    what = f"WORLD_SIZE={ranks}" if env is not None else f"-d {devices}"
    return Devices(names or (), parse_ratios(ratios, ranks, what))


def parse_ratios(ratios: str | None, count: int, what: str) -> tuple[float, ...]:
    """-dr's ratios, ``count`` of them (equal without -dr)."""
    if ratios is None:
        return (1.0,) * count
    try:
        values = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < float("inf") for v in values):
        raise Exl2Error(f"-dr {ratios}: give positive numbers separated by commas, one per device (-dr 1,1.5)")
    if len(values) != count:
        raise Exl2Error(f"-dr {ratios}: {len(values)} ratios for {count} ranks ({what}); give one per rank")
    return values


def check_rows(ranks: int, what: str, rows: dict) -> None:
    """Refuse, before any work, a job whose calibration set has fewer rows than it has ranks: each
    rank holds at least one row of every pass (:meth:`World.row_range`). ``what``: the flag that
    made the ranks (``-d cpu,cpu``, ``WORLD_SIZE=4``); ``rows``: :func:`calib_rows.planned_rows`."""
    for which, (count, source) in rows.items():
        if count >= ranks:
            continue
        flag = "-mr" if which == "measure" else "-r"
        more = {"job": f"resume it on at most {count} devices (the job being resumed fixed its rows)",
                "dataset": f"give more rows ({flag}) or fewer devices",
                "builtin": f"give a parquet dataset with more rows (-c, {flag}) or fewer devices"}[source]
        raise Exl2Error(f"{what}: {ranks} ranks, but the {'measurement' if which == 'measure' else 'quantization'} "
                        f"calibration set has {count} rows and each rank needs at least one; {more}")


# -- the launcher --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback address now (the ranks' process group binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a rank, before it runs: the kernel kills it if the launcher dies (Linux's
    PR_SET_PDEATHSIG), so a killed launcher leaves no orphan computing on its own."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def spawn(argv: list[str], devs: Devices) -> int:
    """Run the command ``argv`` as ``len(devs.names)`` ranks on this machine and return the job's
    exit status. The ranks are in a session of their own, so Ctrl-C reaches the launcher only,
    which passes it to rank 0: rank 0 alone decides where the job stops (the others follow it).
    The other ranks' stderr is kept in files and shown only when one of them is the rank that
    failed: an error every rank meets alike (bad data) is then said once, by rank 0."""
    port = free_port()
    kept = [None] + [tempfile.TemporaryFile(mode="w+") for _ in devs.names[1:]]
    procs = [subprocess.Popen([sys.executable, "-m", "exl2conv", *argv],
                              env=settings.rank_child_environment(r, len(devs.names), port), stderr=kept[r],
                              start_new_session=True, preexec_fn=_die_with_parent)
             for r in range(len(devs.names))]

    def forward(signum, frame):
        if procs[0].poll() is None:
            procs[0].send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, forward)
    try:
        return _supervise(procs, devs, kept)
    finally:
        signal.signal(signal.SIGINT, previous)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in kept[1:]:
            f.close()


def _supervise(procs: list[subprocess.Popen], devs: Devices, kept: list | None = None) -> int:
    """Wait for the ranks; after the first failure, give the others :data:`GRACE_S` to end, then
    kill them. Returns the status of the rank that failed (one that only lost contact,
    :data:`EXIT_PEER`, or was killed counts only if no other failed; rank 0 before the others),
    with one line for it: its own (rank 0's went straight to stderr; another's is copied from
    ``kept``, its stderr file), or the launcher's when it could not say (killed) or stayed quiet
    (lost contact)."""
    deadline = None
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed and deadline is None:
            deadline = time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(POLL_S)
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return EXIT_OK
    culprits = [r for r, c in enumerate(codes) if c not in (0, EXIT_PEER, -signal.SIGKILL)] or \
        [r for r, c in enumerate(codes) if c == -signal.SIGKILL] or [r for r, c in enumerate(codes) if c != 0]
    rank, code = culprits[0], codes[culprits[0]]
    where = f"rank {rank} ({devs.names[rank]})"
    if code > 0 and code != EXIT_PEER and rank > 0 and kept is not None and kept[rank] is not None:
        kept[rank].seek(0)
        sys.stderr.write("\n" + kept[rank].read())  # past rank 0's progress bar, as below
        sys.stderr.flush()
    # on a line of its own: a killed rank may have left its progress bar's line unfinished
    if code < 0:
        print(f"\n ## Error: {where} was killed by {signal.Signals(-code).name}; the other ranks were stopped and "
              "the job's last checkpoint is kept: run the same command to resume", file=sys.stderr, flush=True)
        return EXIT_ERROR
    if code == EXIT_PEER:
        print(f"\n ## Error: {where} lost contact with the other ranks; run the same command to resume",
              file=sys.stderr, flush=True)
    return code


# -- a rank ----------------------------------------------------------------------------------------


def rank_device(devs: Devices | None, device: str | None, local_rank: int) -> torch.device:
    """This rank's device: -d's entry for its local rank; else --device; else its local rank's
    CUDA device where there are CUDA devices, the CPU otherwise (torchrun without -d)."""
    if devs is not None and devs.names:
        if local_rank >= len(devs.names):
            raise Exl2Error(f"-d gives {len(devs.names)} devices, but this is local rank {local_rank}; give one "
                            "device per process of this host")
        return torch.device(devs.names[local_rank])
    if device is not None:
        return torch.device(device)
    count = _cuda_count()
    return torch.device(f"cuda:{local_rank % count}") if count else torch.device(CPU)


def run_rank(env: settings.RankEnvironment, device: torch.device, ratios: tuple[float, ...],
             body: Callable[[distributed.World], None]) -> int:
    """Run ``body`` as this rank, ending with one line and a non-zero status on any failure. A
    failed rank leaves through ``os._exit``: nothing at exit may wait on a process group whose
    other ranks are gone."""
    if device.type == "cpu":
        # the host's cores shared among its ranks: CPU processes that each take every core slow
        # each other down many times over (their threads wait for each other's timeslices)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    try:
        world = distributed.start(env.rank, env.world_size, device, ratios, env.supervised, env.timeout)
        with distributed.use(world):
            body(world)
        distributed.stop(world)
        return EXIT_OK
    except BaseException as exc:  # noqa: BLE001 - every failure of a rank ends it the same way
        code, line = _failure(exc, env)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _failure(exc: BaseException, env: settings.RankEnvironment) -> tuple[int, str | None]:
    """The status and the line (None: stay quiet) for a rank that ended on ``exc``."""
    who = f"rank {env.rank} of {env.world_size}"
    if isinstance(exc, distributed.PeerLost):
        # under the launcher, the rank that failed has said why (or the launcher will)
        return EXIT_PEER, None if env.supervised else f" ## Error ({who}): {exc}"
    if isinstance(exc, Interrupted):
        return exc.exit_code, f" ## Interrupted ({who}): {exc}"
    if isinstance(exc, Exl2Error):
        return exc.exit_code, f" ## Error ({who}): {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f" ## Interrupted ({who}): the last checkpoint is kept; run the same command to resume"
    if isinstance(exc, SystemExit):
        return (exc.code if isinstance(exc.code, int) else EXIT_ERROR), None
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return EXIT_ERROR, f" ## Error ({who}): {exc.__class__.__name__}: {first}{at}"
