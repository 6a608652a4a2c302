"""The streamed checkpoint writer produces exactly the file safetensors would write."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from exl2conv import atomic


@pytest.mark.parametrize("shape,rows", [((5, 7, 3), 2), ((1, 4), 1), ((16, 2, 9), 16), ((3, 5), 7)])
def test_streamed_tensor_file_equals_safetensors(tmp_path, shape, rows):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    atomic.save_tensor_streamed(tmp_path / "a.safetensors", "hidden_states", t, rows_per_write=rows)
    save_file({"hidden_states": t}, str(tmp_path / "b.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["hidden_states"], t)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_streamed_writer_refuses_other_dtypes(tmp_path):
    with pytest.raises(ValueError):
        atomic.save_tensor_streamed(tmp_path / "a.safetensors", "x", torch.zeros(2, dtype=torch.float16))
