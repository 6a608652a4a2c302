"""Console output: progress lines, warnings, -so status lines and progress bars with an ETA.

Lines start as ExLlamaV2's do (" -- " progress, " !! " warning) so logs read the same. No maths
module prints: they return records and the stages report them here.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm


class Reporter:
    def __init__(self, status_output: bool = False, stream=None, quiet: bool = False):
        self.status_output = status_output
        self.stream = stream or sys.stdout
        self.quiet = quiet

    def info(self, msg: str) -> None:
        if not self.quiet:
            _write(f" -- {msg}", self.stream)

    def warn(self, msg: str) -> None:
        _write(f" !! Warning: {msg}", sys.stderr)

    def line(self, msg: str = "") -> None:
        if not self.quiet:
            _write(msg, self.stream)

    def status(self, stage: str, done: int, total: int) -> None:
        """-so: machine-readable progress, ExLlamaV2's format."""
        if self.status_output:
            obj = {"stage": stage, "completion": round(done / max(total, 1), 4)}
            print("[STATUS]", json.dumps(obj), "[/STATUS]", file=self.stream, flush=True)

    @contextmanager
    def progress(self, desc: str, total: int, stage: str | None = None, initial: int = 0) -> Iterator["_Progress"]:
        bar = tqdm(total=total, initial=initial, desc=f" -- {desc}", unit="mod", file=sys.stderr,
                   disable=self.quiet, dynamic_ncols=True, smoothing=0.1,
                   bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        p = _Progress(self, bar, stage, total)
        try:
            yield p
        finally:
            bar.close()


class _Progress:
    def __init__(self, rep: Reporter, bar, stage: str | None, total: int):
        self.rep, self.bar, self.stage, self.total = rep, bar, stage, total

    def update(self, n: int = 1, **postfix) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        if self.stage:
            self.rep.status(self.stage, self.bar.n, self.total)


def _write(msg: str, stream) -> None:
    """A whole line, above any progress bar on the terminal (a plain print would land inside it,
    e.g. an MoE layer's coverage line during the measurement)."""
    tqdm.write(msg, file=stream)
    stream.flush()


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def peak_rss_gib() -> float:
    """This process's peak resident memory: the kernel's high-water mark of its own address
    space (VmHWM) where there is one; ru_maxrss elsewhere, which on Linux also counts what a
    parent shared with it between fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
