"""The streamed checkpoint writer produces exactly the file safetensors would write; every
writer gives its files the usual permissions."""

import os

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


@pytest.mark.parametrize("write", ["json", "bytes", "tensors", "streamed"])
def test_written_files_get_the_usual_permissions(tmp_path, write):
    """0666 less the umask, like any file the user makes: not the temporary file's 0600 (safetensors'
    own writer replaces the temporary file with a 0600 file of its own, which kept that mode)."""
    import stat

    path = tmp_path / "f"
    {"json": lambda: atomic.write_json(path, {"a": 1}),
     "bytes": lambda: atomic.write_bytes(path, b"x"),
     "tensors": lambda: atomic.save_tensors(path, {"t": torch.zeros(2)}),
     "streamed": lambda: atomic.save_tensor_streamed(path, "t", torch.zeros(2, 2))}[write]()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
