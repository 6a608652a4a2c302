"""`exl2conv to-safetensors IN_DIR -o OUT_DIR`: a pickle checkpoint (``pytorch_model.bin``, or
shards named by ``pytorch_model.bin.index.json``) rewritten as safetensors, sharded like the source.

Pickle files can run arbitrary code when unpickled, so they are read only with
``torch.load(weights_only=True)``, which accepts tensors and plain containers and refuses anything
else. One shard is in memory at a time. Every file is written atomically, the index last, and the
input folder is never written to.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch

from exl2conv import atomic
from exl2conv.errors import Exl2Error, FormatError

BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ST_SINGLE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^pytorch_model(-\d+-of-\d+)\.bin$")
# nested layouts some training scripts save instead of a flat state dict
_WRAPPERS = ("state_dict", "model", "module")


def source_shards(in_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """The .bin files to convert, in order, and the source index's weight map (None for one file)."""
    index = in_dir / BIN_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FormatError(f"{index}: not a readable checkpoint index ({exc.__class__.__name__}); "
                              "download it again") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (in_dir / f).is_file()]
        if missing:
            raise Exl2Error(f"{index} names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                            f"not in {in_dir}; download the missing shard files")
        return files, weight_map
    if (in_dir / BIN_SINGLE).is_file():
        return [BIN_SINGLE], None
    raise Exl2Error(f"{in_dir}: no {BIN_SINGLE} and no {BIN_INDEX}; give the folder of a pickle (.bin) checkpoint")


def target_name(bin_name: str) -> str:
    """pytorch_model.bin -> model.safetensors; pytorch_model-00001-of-00002.bin ->
    model-00001-of-00002.safetensors; any other name keeps its stem."""
    if bin_name == BIN_SINGLE:
        return ST_SINGLE
    m = _SHARD_RE.match(bin_name)
    if m:
        return f"model{m.group(1)}.safetensors"
    return Path(bin_name).stem + ".safetensors"


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one pickle file, loaded without running any code from it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise FormatError(f"{path}: refused by safe loading: it holds objects other than tensors "
                          f"({first}); only plain state dicts can be converted safely") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}); "
                          "is it truncated? download it again") from None
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and len(obj) <= 4:
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"{path}: entries {bad[:3]} are not named tensors; not a model state dict")
    return obj


def unshare(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """safetensors refuses tensors that share memory (tied embeddings, views): every tensor after
    the first on a storage becomes its own contiguous copy. Returns the dict and the cloned names."""
    seen: set[int] = set()
    out, cloned = {}, []
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            out[name] = t.clone().contiguous()
            cloned.append(name)
        else:
            if ptr is not None:
                seen.add(ptr)
            out[name] = t.contiguous()
    return out, cloned


def _check_dirs(in_dir: Path, out_dir: Path) -> None:
    if not in_dir.is_dir():
        raise Exl2Error(f"{in_dir}: no such folder; give the folder holding {BIN_SINGLE} or {BIN_INDEX}")
    try:
        out_dir.relative_to(in_dir)
        inside = True
    except ValueError:
        inside = False
    if inside:
        raise Exl2Error(f"-o {out_dir} is inside (or equal to) the input folder {in_dir}; the input is never "
                        "written to: choose an output folder elsewhere")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise Exl2Error(f"-o {out_dir} already exists and is not an empty folder; choose a new one "
                        "(exl2conv never writes over files it did not make)")


def to_safetensors(in_dir: str | Path, out_dir: str | Path, log=print) -> list[str]:
    """Convert the checkpoint in ``in_dir`` into ``out_dir``; returns the names written there
    (weights, index, then the copied files). Tensor names and dtypes are kept as they are."""
    src = Path(in_dir).expanduser().resolve()
    dst = Path(out_dir).expanduser().resolve()
    _check_dirs(src, dst)
    shards, weight_map = source_shards(src)
    dst.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    new_map: dict[str, str] = {}
    total = 0
    for bin_name in shards:
        tensors, cloned = unshare(load_state_dict(src / bin_name))
        if weight_map is not None:
            # the index is the source of truth for which file holds a tensor
            extra = [k for k in tensors if weight_map.get(k) != bin_name]
            if extra:
                raise FormatError(f"{src / bin_name}: holds {extra[0]}, which {BIN_INDEX} places elsewhere; "
                                  "the checkpoint is inconsistent")
        name = target_name(bin_name)
        atomic.save_tensors(dst / name, tensors, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        new_map.update({k: name for k in tensors})
        written.append(name)
        note = f" (copied shared tensors: {', '.join(cloned)})" if cloned else ""
        log(f" -- {bin_name} -> {name}: {len(tensors)} tensors{note}")
        del tensors
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(new_map))
        if missing:
            raise FormatError(f"{src / BIN_INDEX} names {missing[0]}, which is in none of the shards; "
                              "the checkpoint is incomplete")
        atomic.write_json(dst / ST_INDEX, {"metadata": {"total_size": total},
                                           "weight_map": dict(sorted(new_map.items()))}, indent=2)
        written.append(ST_INDEX)
    skip = set(shards) | {BIN_INDEX, ST_SINGLE, ST_INDEX}
    for f in sorted(src.iterdir()):
        if (f.is_file() and not f.name.startswith(".") and f.name not in skip
                and not f.name.endswith((".bin", ".safetensors", ".pt", ".pth", ".ckpt"))):
            atomic.write_via_path(dst / f.name, lambda tmp, s=f: shutil.copyfile(s, tmp))
            written.append(f.name)
    return written
