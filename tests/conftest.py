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
