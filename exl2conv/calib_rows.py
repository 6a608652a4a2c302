"""A job's calibration sets: their token rows (tokenized once and saved in the working folder)
and those rows' embeddings, recomputed from the saved ids wherever a pass needs them.

``ctx`` is the pipeline's Context (its job, cfg, weights, device, folder, tokenizer, reporter).
"""

from __future__ import annotations

from pathlib import Path

import torch

from exl2conv import calibration, noise_rows
from exl2conv.model import arch, forward


def noise_count(cfg, which: str) -> int:
    """The noise rows the built-in set of pass ``which`` ("measure" or "quant") gets for this
    architecture (``ArchSpec.calib_noise``; 0 for most)."""
    return arch.spec_of(cfg).calib_noise[which == "quant"]


def tokenize(ctx, which: str) -> torch.Tensor:
    """Make, log and save the token rows of pass ``which``: from -c's parquet file, or the
    built-in set, then (built-in only, as ExLlamaV2) the architecture's noise rows."""
    job = ctx.job
    measure = which == "measure"
    length = job["measurement_length"] if measure else job["length"]
    noise = None
    if job["cal_dataset"]:
        rows = job["measurement_rows"] if measure else job["dataset_rows"]
        ids = calibration.parquet_rows(ctx.tok, Path(job["cal_dataset"]), rows, length)
    else:
        ids = calibration.builtin_rows(ctx.tok, length, which)
    ctx.rep.info(f"{'Measurement' if measure else 'Quantization'} calibration: {ids.shape[0]} rows x "
                 f"{ids.shape[1]} tokens")
    for line in calibration.describe_rows(ctx.tok, ids).splitlines():
        ctx.rep.info(line)
    if not job["cal_dataset"] and noise_count(ctx.cfg, which):
        ids = noise_rows.append(ids, noise_count(ctx.cfg, which))
        table = ctx.weights.get(arch.embedding_tensor(ctx.cfg), dtype=torch.float32)
        noise = noise_rows.statistics(ids, table, ctx.cfg.embed_scale)
        ctx.rep.info(f"Plus {noise_count(ctx.cfg, which)} noise rows standing in for image embeddings "
                     f"(mean {float(noise[0]):.4g}, std {float(noise[1]):.4g} of the rows' embeddings)")
    ctx.folder.save_ids(which, ids, noise)
    return ids


def embedded_rows(ctx, ids: torch.Tensor, step: int, which: str | None = None, first_row: int = 0):
    """The token embeddings of ``ids`` ``[R, L]`` (with the learned positions where the model has
    them) on ``ctx.device``, ``step`` rows at a time: yields ``(first row, [<=step, L, H]
    float32)``; the table is read once. ``ids`` are rows ``first_row..`` of pass ``which``'s set,
    whose noise rows (if any) get their noise (exl2conv.noise_rows)."""
    table = ctx.weights.get(arch.embedding_tensor(ctx.cfg), dtype=torch.float32, device=ctx.device)
    positions = forward.load_positions(ctx.weights, ctx.cfg, ctx.device)
    noise = None
    if bool(noise_rows.is_noise(ids).any()):
        noise = ctx.folder.load_noise_statistics(which) if which else None
        if noise is None:
            raise ValueError("noise rows need the statistics of their set: name it with which=")
    for r in range(0, ids.shape[0], step):
        x = forward.embed(ids[r:r + step].to(ctx.device), table, ctx.cfg.embed_scale, positions)
        yield r, x if noise is None else noise_rows.fill(x, ids[r:r + step], first_row + r, noise)


def embed_states(ctx, ids: torch.Tensor, home: torch.device | None = None, which: str | None = None,
                 first_row: int = 0) -> torch.Tensor:
    """The token embeddings of ``ids`` ``[R, L]`` (rows ``first_row..`` of the set:
    :func:`embedded_rows`): ``[R, L, H]`` float32 on ``ctx.device``, or computed there a row at a
    time into pinned host memory when ``home`` is the CPU and the device is not."""
    if home is None or home == ctx.device:
        return next(embedded_rows(ctx, ids, ids.shape[0], which, first_row))[1]
    out = torch.empty((*ids.shape, ctx.cfg.hidden_size), dtype=torch.float32, pin_memory=True)
    for r, x in embedded_rows(ctx, ids, 1, which, first_row):
        out[r:r + 1] = x
    return out
