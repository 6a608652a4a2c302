#!/usr/bin/env python
"""Quantize a model for text-generation-webui's ExLlamaV2 loader.

    python examples/quantize_for_webui.py MODEL_DIR [--bits 4.0] [--webui text-generation-webui] [-- EXTRA FLAGS]

Writes a complete model folder (-cf) into <webui>/models/<name>-<bits>bpw-exl2, which the webui
lists under Model with the ExLlamaV2 (or ExLlamaV2_HF) loader. Flags after `--` go to exl2conv
unchanged (e.g. `-- -ml 128 -l 128` for a quick test run).
"""

import argparse
import sys
from pathlib import Path

from exl2conv.cli import main

cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
own, extra = sys.argv[1:cut], sys.argv[cut + 1:]  # flags after -- go to exl2conv
ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("model_dir")
ap.add_argument("--bits", type=float, default=4.0)
ap.add_argument("--webui", default="text-generation-webui", help="the webui's folder (models/ is inside)")
args = ap.parse_args(own)

model = Path(args.model_dir).resolve()
name = f"{model.name}-{args.bits:g}bpw-exl2"
out = Path(args.webui) / "models" / name
work = Path(args.webui) / "exl2conv-work" / name
head = "8" if args.bits >= 6 else "6"
sys.exit(main(["-i", str(model), "-o", str(work), "-cf", str(out), "-b", str(args.bits), "-hb", head, *extra]))
