"""Compile: gather the output tensors in module order, plan the shards, write them atomically,
and with -cf make a complete model folder (ExLlamaV2's conversion/compile.py, compile_model; the
files and their tensors: docs/format.md)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from exl2conv import EXL2_FORMAT_VERSION, atomic, faults, stop
from exl2conv.errors import Exl2Error
from exl2conv.model import arch

DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2, "I64": 8, "U8": 1, "I8": 1}
SKIP_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, byte size, and how to load it."""

    name: str
    nbytes: int
    load: Callable[[], torch.Tensor]


def plan_shards(tensors: list[OutTensor], module_ends: list[int], limit: int) -> list[list[OutTensor]]:
    """ExLlamaV2's shard rule: after each module, once the pending tensors exceed ``limit`` bytes,
    flush a shard taking (in order) every pending tensor that still fits; the rest wait. All that
    remains at the end goes into one last shard. ``module_ends[i]`` is the index one past the last
    tensor of module i."""
    shards: list[list[OutTensor]] = []
    pending: list[OutTensor] = []
    start = 0
    for end in module_ends:
        pending.extend(tensors[start:end])
        start = end
        if sum(t.nbytes for t in pending) > limit:
            shard, rest, size = [], [], 0
            for t in pending:
                if size + t.nbytes <= limit:
                    shard.append(t)
                    size += t.nbytes
                else:
                    rest.append(t)
            if not shard:
                big = max(pending, key=lambda t: t.nbytes)
                raise shard_too_small(big.name, big.nbytes)
            shards.append(shard)
            pending = rest
    pending.extend(tensors[start:])
    if pending:
        shards.append(pending)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["output.safetensors"]
    return [f"output-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def tensor_file_entries(path: Path) -> list[OutTensor]:
    """The tensors of one out_tensor file, sizes from its header (nothing loaded yet)."""
    out = []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            nbytes = DTYPE_BYTES[sl.get_dtype()]
            for d in sl.get_shape():
                nbytes *= d
            out.append(OutTensor(name, nbytes, _loader(path, name)))
    order = {"q_weight": 0, "q_scale": 1, "q_scale_max": 2, "q_groups": 3, "q_invperm": 4, "bias": 5}
    out.sort(key=lambda t: order.get(t.name.rsplit(".", 1)[-1], 9))
    return out


def _loader(path: Path, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    return load


def shard_too_small(name: str, nbytes: int) -> Exl2Error:
    """The refusal of a shard size below one tensor's size (``nbytes``), with the -ss that fits."""
    mb = nbytes / 2**20
    return Exl2Error(f"tensor {name} ({mb:.3g} MB) is larger than the shard size; raise -ss to at least "
                     f"{math.ceil(mb * 100) / 100:g}")


def write_shards(shards: list[list[OutTensor]], dest: Path, on_shard=None) -> list[tuple[str, int]]:
    """Write each shard atomically under its final name; returns (file name, bytes) pairs.
    Older output*.safetensors in ``dest`` that the new plan does not name are removed."""
    names = shard_names(len(shards))
    written = []
    for i, (shard, fname) in enumerate(zip(shards, names)):
        stop.check()  # every shard is written whole or not at all: the stage is redone on resume
        tensors = {t.name: t.load() for t in shard}
        atomic.save_tensors(dest / fname, tensors)
        faults.point("shard")
        written.append((fname, (dest / fname).stat().st_size))
        if on_shard:
            on_shard(i + 1, len(shards))
        del tensors
    for stale in dest.glob("output*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    return written


def copy_model_files(in_dir: Path, dest: Path) -> list[str]:
    """-cf: copy every regular non-weight file of the input folder. Weight files and their index
    files are left out (the index would name files that do not exist in the output)."""
    copied = []
    for src in sorted(Path(in_dir).iterdir()):
        if not src.is_file() or src.name.endswith(SKIP_SUFFIXES) or src.name.startswith("."):
            continue
        atomic.write_via_path(dest / src.name, lambda tmp, s=src: shutil.copyfile(s, tmp))
        copied.append(src.name)
    return copied


def write_quant_config(dest: Path, bits: float, head_bits: int, rows: int, length: int, dataset: str | None) -> None:
    """config.json in ``dest`` gains (or replaces) ``quantization_config``; nothing else changes."""
    path = dest / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise Exl2Error(f"{path}: cannot read the copied config.json ({exc})") from None
    cfg["quantization_config"] = {
        "quant_method": "exl2",
        "version": EXL2_FORMAT_VERSION,
        "bits": float(bits),
        "head_bits": int(head_bits),
        "calibration": {
            "rows": int(rows),
            "length": int(length),
            "dataset": Path(dataset).name if dataset else "(default)",
        },
    }
    atomic.write_json(path, cfg, indent=4, ensure_ascii=True)


def output_tensors(cfg, weights, tensor_file: Callable[[str], Path]) -> tuple[list[OutTensor], list[int]]:
    """Every tensor of the output of model ``cfg`` (its source tensors in ``weights``, a
    :class:`WeightIndex`) in ExLlamaV2's order (exllamav2/conversion/compile.py): the embedding, the
    position table, each module's norms, linears and head norms, the final norm, the head, the
    tensors outside the language model. Returns them with the index after each module's last
    tensor: shards are split only there. ``tensor_file(prefix)``: the quantization pass's file of a
    linear's packed tensors or a tweaked norm's weight."""
    tensors: list[OutTensor] = []
    ends: list[int] = []

    def fp16(name: str, repeat: int = 0, dtype: torch.dtype = torch.float16) -> OutTensor:
        """A tensor copied unquantized; ``repeat`` > 0 expands a q/k norm [d] to [repeat, d]
        (ExLlamaV2 saves the loaded, per-head form: conversion/compile.py, get_f_module, after
        headnorm.py, ExLlamaV2HeadNorm.load)."""
        shape = weights.shape(name)
        n = torch.empty((), dtype=dtype).element_size() * max(repeat, 1)
        for d in shape:
            n *= d
        out = arch.output_name(cfg, name)
        if repeat:
            return OutTensor(out, n, lambda: weights.get(name, dtype=dtype).repeat(repeat, 1))
        return OutTensor(out, n, lambda: weights.get(name, dtype=dtype))

    def norm_entries(name: str) -> list[OutTensor]:
        """A norm's weight as the quantization pass tweaked it, else copied; then its bias."""
        path = tensor_file(name.removesuffix(".weight"))
        bias = arch.norm_bias_tensor(cfg, name)
        return ([tensor_file_entries(path)[0] if path.is_file() else fp16(name)]
                + ([fp16(bias)] if bias else []))

    def embedding() -> OutTensor:
        """The table as ExLlamaV2 writes it: where the config scales the embeddings (Granite,
        MiniCPM), its loader multiplies the float16 table by the factor and the compile divides
        it back, each in float16."""
        name, s = arch.embedding_tensor(cfg), cfg.embedding_multiplier
        entry = fp16(name)
        if s == 1.0:
            return entry
        return OutTensor(entry.name, entry.nbytes, lambda: (weights.get(name, dtype=torch.float16) * s) / s)

    def linear(name: str) -> None:
        tensors.extend(tensor_file_entries(tensor_file(name)))

    tensors.append(embedding())
    ends.append(len(tensors))
    if arch.position_tensor(cfg):  # a module of its own in ExLlamaV2's list
        tensors.append(fp16(arch.position_tensor(cfg)))
        ends.append(len(tensors))
    for i in range(cfg.num_layers):
        for part in ("attn", "mlp"):
            for norm in arch.norm_tensors(cfg, i, part):
                tensors.extend(norm_entries(norm))
            router = arch.router_tensor(cfg, i) if part == "mlp" else None
            if router:  # MoE: norm, router, then w1, w3, w2 expert by expert (ExLlamaV2's compile_model)
                tensors.append(fp16(router))
            for spec in arch.layer_linears(cfg, i, part).values():
                linear(spec.name)
            if part == "attn":
                q_norm, k_norm = arch.head_norm_tensors(cfg, i) or (None, None)
                if q_norm and cfg.use_qk_norm:  # stored per head already (Cohere)
                    tensors += [fp16(q_norm), fp16(k_norm)]
                elif q_norm:
                    tensors += [fp16(q_norm, cfg.num_heads), fp16(k_norm, cfg.num_kv_heads)]
            if part == "mlp" or not arch.spec_of(cfg).parallel:  # a parallel block is one module
                ends.append(len(tensors))
    tensors.extend(norm_entries(arch.final_norm_tensor(cfg)))
    linear(arch.head_spec(cfg, weights).name)
    tensors.extend(fp16(name, dtype=weights.source_dtype(name)) for name in arch.extra_tensors(cfg, weights))
    ends.append(len(tensors))
    return tensors, ends
