"""The refusals due before any work: the command's folders and values, the model's config and
tensors, and the limits of the model that the calibration and the output must respect. Each
raises :class:`Exl2Error` with one line that says what is wrong and what to do."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from exl2conv import calibration, compile as compile_mod
from exl2conv.errors import Exl2Error
from exl2conv.job import Job, calibration_settings, model_fingerprint
from exl2conv.model import arch, exllamav2_config
from exl2conv.model.config import load_config
from exl2conv.model.weights import WeightIndex
from exl2conv.qparams import HEAD_OPTIONS


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False



def check_paths(values: dict[str, Any], out_dir: Path) -> None:
    """Refuse folder combinations that would write into the input or mix outputs."""
    in_dir = values.get("in_dir")
    if in_dir is not None:
        src = Path(in_dir).expanduser().resolve()
        if src.exists() and not src.is_dir():
            raise Exl2Error(f"-i {in_dir} is a file, not a folder; give the Hugging Face model folder that holds "
                            "it (config.json, tokenizer, *.safetensors)")
        if not src.is_dir():
            raise Exl2Error(f"-i {in_dir}: no such folder; give the Hugging Face model folder "
                            "(config.json, tokenizer, *.safetensors)")
        if _inside(out_dir, src):
            raise Exl2Error(f"-o {out_dir} is inside (or equal to) the input folder {src}; the input "
                            "is never written to: choose a working folder elsewhere")
        if values.get("compile_full"):
            cf = Path(values["compile_full"]).expanduser().resolve()
            if _inside(cf, src):
                raise Exl2Error(f"-cf {cf} is inside (or equal to) the input folder {src}; choose an "
                                "output folder elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise Exl2Error(f"-o {out_dir} is a file, not a folder; give a new or empty working folder")
    if values.get("compile_full"):
        cf = Path(values["compile_full"]).expanduser().resolve()
        if cf.exists() and not cf.is_dir():
            raise Exl2Error(f"-cf {cf} exists and is not a folder")
        if cf == out_dir:
            raise Exl2Error(f"-cf {cf} is the working folder itself; give another folder (or leave "
                            "out -cf to write the shards into the working folder)")
    if values.get("output_measurement") and values.get("reuse_measurement"):
        raise Exl2Error("-om (measure, then save the measurement) and -m (reuse a measurement, no measuring) "
                        "cannot be combined: copy the measurement file instead, or leave out one of them")
    if values.get("output_measurement") and values.get("compile_full"):
        raise Exl2Error("-om (measure only) and -cf (compile a full model) cannot be combined: "
                        "run -om first, then a second job with -m and -cf")
    hb = values.get("head_bits")
    if hb is not None and int(hb) not in HEAD_OPTIONS:
        raise Exl2Error(f"-hb {hb} is not a head layout; choose one of {sorted(HEAD_OPTIONS)}")
    for flag, field_, lo in (("-l", "length", 1), ("-ml", "measurement_length", 1),
                             ("-r", "dataset_rows", 1), ("-mr", "measurement_rows", 1)):
        v = values.get(field_)
        if v is not None and int(v) < lo:
            raise Exl2Error(f"{flag} {v}: must be at least {lo}")
    if not values.get("cal_dataset"):
        for flag, field_ in (("-l", "length"), ("-ml", "measurement_length")):
            v = values.get(field_)
            if v is not None and min(int(v), calibration.MAX_CTX) % calibration.CHUNK:
                raise Exl2Error(f"{flag} {v}: the built-in calibration set needs a row length that is a multiple "
                                f"of {calibration.CHUNK} (e.g. {_multiple_below(int(v), calibration.CHUNK)}), "
                                "or give a parquet dataset with -c")
    b = values.get("bits")
    if b is not None and not (math.isfinite(float(b)) and float(b) > 0):
        raise Exl2Error(f"-b {b}: give a positive number of bits per weight, e.g. -b 4.0")
    ss = values.get("shard_size")
    if ss is not None and float(ss) < 0:
        raise Exl2Error(f"-ss {ss}: the shard size in MB cannot be negative (0 means unlimited)")
    cpi = values.get("checkpoint_interval")
    if cpi is not None and float(cpi) < 0:
        raise Exl2Error(f"-cpi {cpi}: the checkpoint interval in seconds cannot be negative")



def load_model(in_dir: Path, rope_scale: float | None, rope_alpha: float | None) -> tuple[Any, WeightIndex]:
    """config.json and the safetensors index of ``in_dir``, checked against each other (headers
    only: no tensor data is read)."""
    cfg = load_config(in_dir, rope_scale, rope_alpha)
    exllamav2_config.check_expressible(cfg)
    weights = WeightIndex(in_dir)
    weights.check(arch.expected_tensors(cfg))
    return cfg, weights



def model_fingerprint_of(cfg: Any, weights: WeightIndex) -> str:
    return model_fingerprint(cfg.raw, {n: (e.dtype, e.shape) for n, e in weights.entries.items()})



def check_model_unchanged(job: Job, cfg: Any, weights: WeightIndex) -> None:
    """A resumed job must find the model it started with."""
    fp = model_fingerprint_of(cfg, weights)
    saved = (job["fingerprint"] or {}).get("model")
    if saved is None:
        job["fingerprint"] = {"model": fp, "calibration": calibration_settings(job.data)}
        job.save()
    elif saved != fp:
        raise Exl2Error(f"the model in {job['in_dir']} is not the one this job started with (its tensor "
                        "names, shapes, dtypes or config.json changed); restore it, or start afresh with -nr")



def pick_device(name: str | None) -> torch.device:
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise Exl2Error(f"--device {name}: no CUDA device is available here; leave --device out to use the CPU")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")



def check_positions(cfg, job: Job) -> None:
    """A model with learned positions (GPTBigCode) has rows for its first n positions only: longer
    calibration rows are refused before any work."""
    if arch.position_tensor(cfg) is None:
        return
    for flag, field_ in (("-l", "length"), ("-ml", "measurement_length")):
        if int(job[field_]) > cfg.max_position_embeddings:
            raise Exl2Error(f"{flag} {job[field_]}: {cfg.arch} has learned positions for its first "
                            f"{cfg.max_position_embeddings} tokens only; give {flag} {cfg.max_position_embeddings} "
                            "or less")



def check_shard_size(cfg, weights: WeightIndex, shard_mb: float) -> None:
    """-ss below the size of the embedding table, which the output copies in float16 (usually its
    largest tensor: a quantized linear takes at most about a byte per weight), is refused before
    any work; the compile stage still checks every tensor."""
    name = arch.embedding_tensor(cfg)
    nbytes = 2 * math.prod(weights.shape(name))
    if nbytes > shard_mb * 2**20:
        raise compile_mod.shard_too_small(arch.output_name(cfg, name), nbytes)


def _multiple_below(value: int, step: int) -> int:
    """The largest multiple of ``step`` not above ``value``, and at least ``step``."""
    return max(step, value // step * step)
