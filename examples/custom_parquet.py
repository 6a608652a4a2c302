#!/usr/bin/env python
"""Quantize at a low bitrate with your own calibration data from a parquet file.

    python examples/custom_parquet.py MODEL_DIR TEXT_FILES... [--out DIR] [--bits 2.5] [-- EXTRA FLAGS]

At low bitrates (below about 3 bpw) the choice of layouts depends strongly on what the calibration
rows look like; text like the model's real use (your language, domain, chat format) helps. This
writes the text files into DIR/calibration.parquet (one row per file, column "text"), then
converts with `-c`. With -c the row counts come from -r and -mr.
"""

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from exl2conv.cli import main

cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
own, extra = sys.argv[1:cut], sys.argv[cut + 1:]  # flags after -- go to exl2conv
ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("model_dir")
ap.add_argument("texts", nargs="+", help="UTF-8 text files")
ap.add_argument("--out", default="exl2-custom")
ap.add_argument("--bits", type=float, default=2.5)
args = ap.parse_args(own)

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
parquet = out / "calibration.parquet"
texts = [Path(t).read_text(encoding="utf-8") for t in args.texts]
pq.write_table(pa.table({"text": texts}), str(parquet))
sys.exit(main(["-i", str(Path(args.model_dir).resolve()), "-o", str(out / "work"), "-cf", str(out / "model"),
               "-c", str(parquet), "-b", str(args.bits), "-hb", "6", *extra]))
