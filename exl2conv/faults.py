"""Fault injection for the crash-safety tests.

``EXL2CONV_FAULT=<point>:<n>[:<action>][@<rank>]`` acts the n-th time the process reaches
``<point>``; with ``@<rank>``, only in that rank of a job on several processes (every process of
such a job reads the same variable). Several specs may be given, separated by commas. Actions:

- ``kill`` (default): SIGKILL, as a power cut or the OOM killer would;
- ``sigint``: SIGINT to itself, as Ctrl-C would;
- ``enospc``: an ``OSError(ENOSPC)`` raised at the point (where the point names a file being
  written, that file is first cut to half its size: a disk that filled up mid-write).

Points: ``write`` (a file fully written but not yet renamed into place), ``module`` (a module
finished, before its checkpoint), ``measurement`` (measurement.json saved, before the
checkpoint that goes with it), ``checkpoint`` (the states file written, before the job names
it), ``shard`` (an output shard written, before the next), ``stage`` (a stage finished and saved,
before the next starts), ``stage_start`` (a stage about to run). Unset, a point costs one
environment lookup.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from exl2conv import distributed, settings

ENV = settings.FAULT_VARIABLE
POINTS = ("write", "module", "measurement", "checkpoint", "shard", "stage", "stage_start")
ACTIONS = ("kill", "sigint", "enospc")

_counts: dict[str, int] = {}


def reset() -> None:
    """Forget how often each point was reached (for in-process tests)."""
    _counts.clear()


def parse(spec: str, rank: int = 0) -> list[tuple[str, int, str]]:
    """``"write:3,module:2:sigint"`` -> ``[("write", 3, "kill"), ("module", 2, "sigint")]``; the
    faults of ranks other than ``rank`` left out."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part, _, only = part.partition("@")
        if only and not only.isdigit():
            raise ValueError(f"{ENV}={spec!r}: @<rank> takes a rank number")
        if only and int(only) != rank:
            continue
        fields = part.split(":")
        if len(fields) not in (2, 3) or fields[0] not in POINTS or not fields[1].isdigit():
            raise ValueError(f"{ENV}={spec!r}: each fault is <point>:<n>[:<action>], point one of {POINTS}")
        action = fields[2] if len(fields) == 3 else "kill"
        if action not in ACTIONS:
            raise ValueError(f"{ENV}={spec!r}: action {action!r} is not one of {ACTIONS}")
        out.append((fields[0], int(fields[1]), action))
    return out


def point(name: str, path: str | Path | None = None) -> None:
    """Reached ``name``; ``path`` is the file being written there, if any."""
    spec = settings.fault_spec()
    if not spec:
        return
    faults = [f for f in parse(spec, distributed.active().rank) if f[0] == name]
    if not faults:
        return
    _counts[name] = _counts.get(name, 0) + 1
    for _, n, action in faults:
        if _counts[name] == n:
            _act(action, path)


def _act(action: str, path: str | Path | None) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    else:
        if path is not None and os.path.isfile(path):
            os.truncate(path, os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)
