"""The CUDA extension's build cache (exl2conv.kernels), checked without a GPU: what marks a built
library as current, so that a cached one loads directly and a stale one is rebuilt."""

import shutil

from exl2conv import kernels


def test_stamp_follows_sources_flags_and_architecture(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(kernels.CSRC, csrc)
    monkeypatch.setattr(kernels, "CSRC", csrc)
    first = kernels.stamp("9.0")
    assert kernels.stamp("9.0") == first
    assert kernels.stamp("8.0") != first
    cu = next(csrc.glob("*.cu"))
    cu.write_text(cu.read_text() + "\n// edited\n")
    edited = kernels.stamp("9.0")
    assert edited != first
    monkeypatch.setattr(kernels, "CUDA_CFLAGS", kernels.CUDA_CFLAGS + ["-G"])
    assert kernels.stamp("9.0") != edited
    (csrc / "extra.cpp").write_text("// a new source\n")
    assert kernels.stamp("9.0") not in (first, edited)
