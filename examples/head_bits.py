#!/usr/bin/env python
"""Pick the head (lm_head) bits to match the bitrate: 8 for 6 bpw and more, else 6.

    python examples/head_bits.py MODEL_DIR --bits 6.0 [--out DIR] [-- EXTRA FLAGS]

The head is quantized with a fixed layout (-hb), not by the bitrate search. A 6-bit head costs
about 6.3 bpw on the head alone, so at a decoder bitrate of 6 or more an 8-bit head (8.03 bpw)
keeps it from being the weakest part; below that, 6 is the usual choice. Prints the head bpw
that `exl2conv inspect` reads back.
"""

import argparse
import sys
from pathlib import Path

from exl2conv.cli import main
from exl2conv.inspect import inspect

cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
own, extra = sys.argv[1:cut], sys.argv[cut + 1:]  # flags after -- go to exl2conv
ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("model_dir")
ap.add_argument("--bits", type=float, default=6.0)
ap.add_argument("--out", default="exl2-head-bits")
args = ap.parse_args(own)

head = 8 if args.bits >= 6 else 6
out = Path(args.out)
rc = main(["-i", str(Path(args.model_dir).resolve()), "-o", str(out / "work"), "-cf", str(out / "model"),
           "-b", str(args.bits), "-hb", str(head), *extra])
if rc:
    sys.exit(rc)
res = inspect(out / "model")
print(f"head bits {head}: head {res['head_bpw']:.3f} bpw, decoder {res['decoder_bpw']:.3f} bpw")
