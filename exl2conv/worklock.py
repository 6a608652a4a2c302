"""One writer per working folder: an advisory lock on ``<work dir>/job.lock``.

The lock is the kernel's (``flock``), not the file's existence: it dies with the process that
holds it, so a job killed by SIGKILL, the OOM killer or a power cut leaves nothing that blocks its
resume. The file itself stays behind (removing it would let a third process lock a new file while
a second still holds the old one); what it holds, the holder's pid, host and start time, is only
there for the message a refused process prints.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from exl2conv.errors import Exl2Error

LOCK_FILE = "job.lock"


class WorkLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WorkLock":
        """Take the lock or raise :class:`Exl2Error` naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise Exl2Error(f"another exl2conv process is running the job in {self.path.parent} "
                            f"({describe_holder(self.path)}); wait for it to finish or stop it, then run "
                            "the command again") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(path: Path) -> str:
    """"pid 123 on host, since 2026-12-07 01:02:03" from a lock file, as far as it can be read (the
    holder may not have written it yet)."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"pid {int(holder['pid'])} on {holder['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is just starting"
