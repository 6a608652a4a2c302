#!/usr/bin/env python
"""Convert a pickle (.bin) checkpoint to safetensors, then quantize it.

    python examples/bin_to_safetensors.py MODEL_DIR [--out DIR] [-- EXTRA FLAGS]

exl2conv reads safetensors only. `exl2conv to-safetensors` loads pytorch_model.bin (or its shards)
with torch.load(weights_only=True), which refuses pickled code, and writes model.safetensors (or
matching shards and model.safetensors.index.json) plus the folder's other files.
"""

import argparse
import sys
from pathlib import Path

from exl2conv.cli import main

cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
own, extra = sys.argv[1:cut], sys.argv[cut + 1:]  # flags after -- go to exl2conv
ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("model_dir")
ap.add_argument("--out", default="exl2-from-bin")
args = ap.parse_args(own)

out = Path(args.out)
st = out / "safetensors"
if not st.is_dir():
    rc = main(["to-safetensors", str(Path(args.model_dir).resolve()), "-o", str(st)])
    if rc:
        sys.exit(rc)
sys.exit(main(["-i", str(st), "-o", str(out / "work"), "-cf", str(out / "model"), "-b", "4.0", *extra]))
