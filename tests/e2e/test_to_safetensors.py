"""exl2conv to-safetensors: safe loading, sharding like the source, tied tensors, refusals."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exl2conv.cli import main
from exl2conv.errors import Exl2Error, FormatError
from exl2conv.to_safetensors import target_name, to_safetensors


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(32, 8, generator=g).half()
    return {"model.embed_tokens.weight": emb, "lm_head.weight": emb,  # tied: one storage
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(8, generator=g)[::1]}


def test_single_file_with_tied_tensors(tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    sd = _state()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (src / "tokenizer.json").write_text("{}")
    written = to_safetensors(src, tmp_path / "st", log=lambda m: None)
    assert written == ["model.safetensors", "config.json", "tokenizer.json"]
    out = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v)
    assert (tmp_path / "st" / "config.json").read_text() == (src / "config.json").read_text()
    assert not (tmp_path / "st" / "pytorch_model.bin").exists()
    assert sorted(os.listdir(src)) == ["config.json", "pytorch_model.bin", "tokenizer.json"]  # input untouched


def test_sharded_like_the_source(tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    sd = _state(1)
    names = sorted(sd)
    parts = [names[:2], names[2:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, src / fname)
        weight_map.update({k: fname for k in part})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dst = tmp_path / "st"
    assert main(["to-safetensors", str(src), "-o", str(dst)]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    total = 0
    for k, f in index["weight_map"].items():
        t = load_file(str(dst / f))[k]
        assert torch.equal(t, sd[k])
        assert f == target_name(weight_map[k])
        total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert not (dst / "pytorch_model.bin.index.json").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    src = tmp_path / "bin"
    src.mkdir()
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormatError, match="safe loading"):
        to_safetensors(src, tmp_path / "st", log=lambda m: None)
    assert not (tmp_path / "PWNED").exists()


def test_refusals(tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(_state(), src / "pytorch_model.bin")
    with pytest.raises(Exl2Error, match="inside"):
        to_safetensors(src, src / "st")
    with pytest.raises(Exl2Error, match="inside"):
        to_safetensors(src, src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("mine")
    with pytest.raises(Exl2Error, match="not an empty folder"):
        to_safetensors(src, busy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exl2Error, match="no pytorch_model.bin"):
        to_safetensors(empty, tmp_path / "out")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}))
    with pytest.raises(Exl2Error, match="download the missing"):
        to_safetensors(src, tmp_path / "out2")


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["to-safetensors", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("## Error:") and "no such folder" in err and "\n" not in err
