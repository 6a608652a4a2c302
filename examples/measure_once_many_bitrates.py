#!/usr/bin/env python
"""Measure a model once, then quantize it at several bitrates from that measurement.

    python examples/measure_once_many_bitrates.py MODEL_DIR [--out DIR] [--bits 4.0 4.5] [-- EXTRA FLAGS]

The measurement pass is the slow part and does not depend on the target bitrate: `-om` saves it,
and each bitrate then runs with `-m` (no measurement), writing DIR/<name>-<bits>bpw-exl2.
"""

import argparse
import sys
from pathlib import Path

from exl2conv.cli import main

cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
own, extra = sys.argv[1:cut], sys.argv[cut + 1:]  # flags after -- go to exl2conv
ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("model_dir")
ap.add_argument("--out", default="exl2-out")
ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 4.5])
args = ap.parse_args(own)

model = Path(args.model_dir).resolve()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
measurement = out / "measurement.json"
if not measurement.is_file():
    # 1. measure only: the job ends after the measurement pass and copies measurement.json out
    rc = main(["-i", str(model), "-o", str(out / "work-measure"), "-om", str(measurement), *extra])
    if rc:
        sys.exit(rc)
for bits in args.bits:
    # 2. one job per bitrate, reusing the measurement
    head = "8" if bits >= 6 else "6"
    rc = main(["-i", str(model), "-o", str(out / f"work-{bits:g}"), "-m", str(measurement),
               "-cf", str(out / f"{model.name}-{bits:g}bpw-exl2"), "-b", str(bits), "-hb", head, *extra])
    if rc:
        sys.exit(rc)
