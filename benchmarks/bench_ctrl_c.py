"""How long Ctrl-C takes to stop a conversion, stage by stage.

Starts the converter, waits until it prints that a stage has begun, lets it run ``--delay``
seconds more, sends SIGINT and times how long the process takes to exit (the stop at the next safe
point, the checkpoint it writes and the interpreter's exit). The next stage's run resumes the
same job with the same command, so one job is stopped once in each long stage and then finished;
the finished output is compared with an uninterrupted run's when ``--reference`` is given.

    python benchmarks/bench_ctrl_c.py --model SMOLLM2_DIR --work /tmp/cc -- -b 4.0 -ml 256 -l 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the converter prints as each long stage starts (pipeline.py's rep.info lines)
MARKERS = [("sensitivity", "Output sensitivity of each module"), ("measure_quant", "Measuring quantization impact"),
           ("quant", "Quantizing...")]


def start(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def drain(stream, sink: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: sink.extend(stream), daemon=True)
    t.start()
    return t


def stop_in(cmd: list[str], marker: str, delay: float) -> dict:
    proc = start(cmd)
    err: list[str] = []
    drain(proc.stderr, err)
    seen = None
    for line in proc.stdout:
        if marker in line:
            seen = time.monotonic()
            break
    if seen is None:
        proc.wait()
        return {"reached": False, "rc": proc.returncode}
    time.sleep(delay)
    if proc.poll() is not None:
        return {"reached": True, "finished_first": True, "rc": proc.returncode}
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest: list[str] = []
    drain(proc.stdout, rest)
    rc = proc.wait()
    return {"reached": True, "rc": rc, "stop_s": time.monotonic() - t0,
            "error": next((e.strip() for e in err if e.startswith(" ## ")), None)}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("output*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the model folder to convert")
    ap.add_argument("--work", required=True, help="a new folder for the job")
    ap.add_argument("--delay", type=float, default=3.0, help="seconds into each stage before Ctrl-C (default 3)")
    ap.add_argument("--reference", help="an uninterrupted run's working folder, to compare the output with")
    ap.add_argument("convert_args", nargs="*", help="more converter arguments (after --)")
    args = ap.parse_args()
    work = Path(args.work)
    cmd = [sys.executable, "-m", "exl2conv", "-i", args.model, "-o", str(work), *args.convert_args]
    print(f"command: {' '.join(cmd[1:])}")
    for stage, marker in MARKERS:
        r = stop_in(cmd, marker, args.delay)
        job = json.loads((work / "job.json").read_text()) if (work / "job.json").exists() else {}
        cp = job.get("checkpoint") or {}
        if "stop_s" in r:
            print(f"{stage:14s} Ctrl-C {args.delay:.1f} s in: exited in {r['stop_s']:.2f} s with code {r['rc']}; "
                  f"job at {job.get('progress')}, checkpoint after module {cp.get('module')}; {r['error']}")
        else:
            print(f"{stage:14s} not stopped: {r}")
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    print(f"resumed to the end in {time.monotonic() - t0:.1f} s, exit code {done.returncode}")
    if args.reference:
        same = digest(work) == digest(Path(args.reference))
        print(f"output identical to the uninterrupted run's: {same}")


if __name__ == "__main__":
    main()
