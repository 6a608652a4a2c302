#!/usr/bin/env python
"""Resume an interrupted conversion: run the same command again.

    python examples/resume.py MODEL_DIR [--out DIR] [--stop-after SECONDS] [-- EXTRA FLAGS]

Starts `exl2conv` in a subprocess, interrupts it with Ctrl-C (SIGINT) after --stop-after seconds
(it saves a checkpoint and exits with status 130), then runs the identical command, which picks
the job up from its job.json. A job that finished before the interrupt just prints its summary.
"""

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
own, extra = sys.argv[1:cut], sys.argv[cut + 1:]  # flags after -- go to exl2conv
ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("model_dir")
ap.add_argument("--out", default="exl2-resume")
ap.add_argument("--stop-after", type=float, default=5.0)
args = ap.parse_args(own)

out = Path(args.out)
cmd = [sys.executable, "-m", "exl2conv", "-i", str(Path(args.model_dir).resolve()), "-o", str(out / "work"),
       "-cf", str(out / "model"), "-b", "4.0", *extra]
first = subprocess.Popen(cmd)
time.sleep(args.stop_after)
if first.poll() is None:
    first.send_signal(signal.SIGINT)  # what Ctrl-C does: stop at the next safe point
rc = first.wait()
print(f"first run exited with {rc} (130 = interrupted, state saved)")
if rc not in (0, 130):
    sys.exit(rc)
sys.exit(subprocess.call(cmd))  # the same command resumes
