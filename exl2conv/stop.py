"""Ctrl-C as a request to stop at the next safe point, within seconds, in every stage.

A conversion's SIGINT handler calls :func:`request`. Long loops (forward chunks, GPTQ blocks,
candidate scoring, norm-tweak steps, the sensitivity passes, shard writing) call :func:`check`,
which raises :class:`StopRequested` once a stop is asked for. Whoever catches it decides what is
safe to keep: the module loops checkpoint the states from before the module they were in
(exl2conv.pipeline), every other stage is simply run again on resume.

A block that overwrites state a checkpoint would need (the quantization pass writing a module's
outputs over its inputs) runs under :func:`held`, where :func:`check` does nothing; the stop then
comes at the first check after it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from exl2conv.errors import Interrupted

_requested = threading.Event()
_held = threading.local()


class StopRequested(Interrupted):
    """Raised by :func:`check` after Ctrl-C; the caller saves what is safe and reports."""

    def __init__(self, message: str = "stopped by Ctrl-C"):
        super().__init__(message)


def request() -> None:
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def reset() -> None:
    """Forget a request (a new conversion starts with none)."""
    _requested.clear()


def check() -> None:
    """Raise :class:`StopRequested` when a stop was asked for, unless inside :func:`held`."""
    if _requested.is_set() and not getattr(_held, "depth", 0):
        raise StopRequested()


@contextmanager
def held() -> Iterator[None]:
    """A block that must run to its end once started: :func:`check` waits until after it."""
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1
