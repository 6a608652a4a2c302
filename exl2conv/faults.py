"""Fault injection for the crash-safety tests.

``EXL2CONV_FAULT=<point>:<n>`` makes the process kill itself with SIGKILL the n-th time it reaches
``<point>`` (``write``: a file fully written but not yet renamed into place; ``module``: a module
finished, before its checkpoint; ``stage``: a stage finished, before the job advances). Unset, a
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("EXL2CONV_FAULT")
    if not spec:
        return
    want, _, n = spec.rpartition(":")
    if want != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
