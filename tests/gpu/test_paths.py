"""The GPU path against the CPU path on the same inputs (run on the device machine; skipped
elsewhere): the sensitivity stage draws the same tokens on both, so their Fisher estimates differ
only by arithmetic."""

import pytest
import torch

from exl2conv import sensitivity
from exl2conv.model import WeightIndex, load_config
from tests.tinymodel import make_tiny_llama

pytestmark = pytest.mark.gpu


def test_sample_draws_the_same_tokens_on_cuda_and_cpu():
    gen = torch.Generator().manual_seed(4)
    logp = torch.log_softmax(3 * torch.randn(2048, 49152, generator=gen), -1)
    cpu = sensitivity.sample(logp, torch.Generator().manual_seed(0))
    cuda = sensitivity.sample(logp.cuda(), torch.Generator().manual_seed(0))
    assert cuda.device.type == "cuda"
    # float64 cumulative sums: a draw moves between the devices' orders of addition only within
    # about 1e-12 of a boundary (in float32, 0.34 % of these draws moved on an H100)
    assert torch.equal(cuda.cpu(), cpu), (cuda.cpu() != cpu).float().mean()


def test_fisher_diagonals_agree_between_cuda_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("EXL2CONV_NO_TF32", "1")  # full float32 on both: only the order of sums differs
    src = make_tiny_llama(tmp_path / "m", seed=5, hidden=64, intermediate=128, layers=2)
    cfg, index = load_config(src), WeightIndex(src)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    cpu = sensitivity.fisher_diagonals(index, cfg, ids, torch.device("cpu"))
    cuda = sensitivity.fisher_diagonals(index, cfg, ids, torch.device("cuda"))
    assert cuda.device.type == "cpu" and cuda.shape == cpu.shape
    rel = (cuda.sum(1) - cpu.sum(1)).abs() / cpu.sum(1)
    assert rel.max() < 1e-3, rel
    torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-6 * float(cpu.max()))
