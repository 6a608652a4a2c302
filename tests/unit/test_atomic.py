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


def test_remove_temps_takes_only_interrupted_writes(tmp_path):
    """Our own temporaries (.<name>.<8 random>.tmp) and safetensors' (.tmp<6 random>, its Rust
    writer's, renamed into place when done: a kill in between leaves it) go; nothing else."""
    from exl2conv.atomic import remove_temps
    ours, theirs = ".output.safetensors.ab12_x9z.tmp", ".tmpeiXgLe"
    keep = [".tmpeiXgL", ".tmpeiXgLe1", "tmpeiXgLe", ".tmp-iXgLe", "notes.tmp", "model.safetensors"]
    for name in [ours, theirs, *keep]:
        (tmp_path / name).write_text("x")
    assert sorted(remove_temps(tmp_path)) == sorted([ours, theirs])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
