#!/usr/bin/env python3
"""Read model folders with ExLlamaV2 0.3.2's own config reader, on a machine without CUDA.

ExLlamaV2Config.prepare (exllamav2/config.py) recognizes the architecture, checks the expected
tensor names under its lm_prefix, and reads config.json and, for a vision-language model,
preprocessor_config.json: what it refuses, its loader would refuse on the GPU too. Its package
imports its CUDA extension at import time, so this loads the package's modules from an unpacked
wheel with that extension replaced by a stub; nothing here runs a model.

Usage:

    unzip -q exllamav2-0.3.2-py3-none-any.whl -d /tmp/exl2src
    python tools/exllamav2_reads.py --source /tmp/exl2src FOLDER [FOLDER ...]

Prints, per folder, what ExLlamaV2 read (architecture, lm_prefix, RoPE base, mrope sections,
vision tower type and sizes) or the error it raised; exits 1 if any folder failed.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path


def load_reader(source: Path):
    """ExLlamaV2Config from the unpacked package at ``source`` (the folder holding exllamav2/)."""
    package = types.ModuleType("exllamav2")
    package.__path__ = [str(source / "exllamav2")]  # its __init__ (which loads the extension) never runs
    ext = types.ModuleType("exllamav2.ext")
    ext.none_tensor, ext.exllamav2_ext = None, None
    sys.modules.update({"exllamav2": package, "exllamav2.ext": ext})
    from exllamav2.config import ExLlamaV2Config
    return ExLlamaV2Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="folder holding the unpacked exllamav2/ package")
    parser.add_argument("folders", type=Path, nargs="+")
    args = parser.parse_args(argv)
    reader = load_reader(args.source)
    failed = 0
    for folder in args.folders:
        try:
            c = reader(str(folder))
        except Exception as exc:  # noqa: BLE001 - whatever ExLlamaV2 raises is the finding
            print(f"{folder}: FAILED {type(exc).__name__}: {exc}")
            failed += 1
            continue
        print(f"{folder}: {c.architecture}, lm_prefix {c.arch.lm_prefix!r}, hidden {c.hidden_size}, "
              f"layers {c.num_hidden_layers}, head_dim {c.head_dim}, RoPE base {c.rotary_embedding_base}, "
              f"mrope_section {getattr(c, 'mrope_section', None)}, float16 RoPE frequencies {c.arch.lm.rope_freq_half}; "
              f"vision {c.vision_model_type} (hidden {getattr(c, 'vision_hidden_size', None)}, "
              f"patch {getattr(c, 'vision_patch_size', None)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
