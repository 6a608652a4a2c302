import pytest
import torch

from tests.tinymodel import make_tiny_llama

# A tiny Llama with attention and MLP biases (the gate/up biases are stored in the down
# projection's q_perm order), converted on the CPU: the EXL2 folder the runtime's front ends load.
TINY_ROWS = ["-b", "4.0", "-ml", "128", "-l", "128", "-mr", "4", "-r", "8", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_exl2(tmp_path_factory):
    """(EXL2 folder, its FP16 source folder), converted once per session (about 6 s)."""
    from exl2conv.cli import main

    base = tmp_path_factory.mktemp("tiny_exl2")
    src = make_tiny_llama(base / "src", seed=1, attention_bias=True, mlp_bias=True)
    assert main(["-i", str(src), "-o", str(base / "w"), "-cf", str(base / "out"), *TINY_ROWS]) == 0
    return base / "out", src


@pytest.fixture(scope="session")
def tiny_ids():
    return torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(0))
