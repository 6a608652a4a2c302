"""The built wheel (pyproject.toml) carries the CUDA kernels' sources: csrc/ ships as exl2conv/_csrc,
where exl2conv.kernels finds them once installed (without them it would fall back to torch)."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from exl2conv import kernels

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build the wheel")
def test_the_wheel_carries_the_kernel_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("exl2conv", "csrc"):  # a copy: the build writes build/ and egg-info beside the sources
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, cwd=src, timeout=120)
    (wheel,) = out.glob("exl2conv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"exl2conv/_csrc/{p.name}" for p in sorted((REPO / "csrc").iterdir()) if p.suffix in (".cpp", ".cu", ".h", ".cuh")}
    assert want and want <= names, sorted(want - names)
    assert "exl2conv/kernels.py" in names and "exl2conv/model/forward.py" in names
    assert "exl2conv/_csrc/exl2_linear_kernels.cuh" in names  # the device code's header
    assert "exl2conv/runtime/linear.py" in names and "exl2conv/runtime/model.py" in names
    assert "exl2conv/hf_hook.py" in names


def test_kernels_find_the_sources_in_either_layout(tmp_path, monkeypatch):
    """Installed from a wheel, the sources sit in the package (exl2conv/_csrc); in a checkout, at the
    repository root (csrc/). The first place that holds them wins."""
    wheel_place, repo_place = tmp_path / "pkg" / "_csrc", tmp_path / "csrc"
    monkeypatch.setattr(kernels, "CSRC_PLACES", (wheel_place, repo_place))
    assert kernels.find_csrc() == repo_place  # neither: the checkout's, where the warning points
    shutil.copytree(REPO / "csrc", repo_place)
    assert kernels.find_csrc() == repo_place
    shutil.copytree(REPO / "csrc", wheel_place)
    assert kernels.find_csrc() == wheel_place


def test_missing_sources_with_cuda_warn_once_and_fall_back(tmp_path, monkeypatch, capsys):
    """A GPU but no kernel sources (an install that lost them): one warning line, then the torch path."""
    import torch

    from exl2conv import settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "CSRC", tmp_path)
    monkeypatch.setattr(kernels, "_state", {})
    with settings.use(settings.Settings(kernels=True)):
        assert kernels.get() is None
        assert kernels.get() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kernel sources are not installed" in err
