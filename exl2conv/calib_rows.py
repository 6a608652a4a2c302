"""A job's calibration sets: their token rows (tokenized once and saved in the working folder)
and those rows' embeddings, recomputed from the saved ids wherever a pass needs them.

``ctx`` is the pipeline's Context (its job, cfg, weights, device, folder, tokenizer, reporter).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from exl2conv import calibration, noise_rows
from exl2conv.errors import Exl2Error
from exl2conv.job import ARG_BY_FIELD, JOB_FILE, ROWS_USED, STAGE_ORDER, Stage
from exl2conv.model import arch, forward


def noise_count(cfg, which: str) -> int:
    """The noise rows the built-in set of pass ``which`` ("measure" or "quant") gets for this
    architecture (``ArchSpec.calib_noise``; 0 for most)."""
    return arch.spec_of(cfg).calib_noise[which == "quant"]


class PlannedRows(NamedTuple):
    """A pass's calibration row count and where it comes from: "job" (recorded by the job being
    resumed: fixed), "dataset" (-mr / -r of a parquet dataset) or "builtin" (the built-in set's)."""
    count: int
    source: str


def planned_rows(values: dict, out_dir: str | Path, no_resume: bool = False) -> dict[str, PlannedRows]:
    """The calibration rows of each pass the job is still to run (``{"measure": .., "quant": ..}``),
    known before any work: what the working folder's job recorded (a resume), else -mr / -r with a
    parquet dataset or the built-in set's own count (and the architecture's noise rows) without
    one. ``values``: the command's job fields (None where not given: then the saved job's, else the
    default). A pass the job will not run (-m reuses a measurement, -om ends after it, the job is
    past it) is left out, and so is the built-in set of a model whose config cannot be read (the
    job refuses that model itself, with its own line)."""
    saved: dict = {}
    job_file = Path(out_dir).expanduser() / JOB_FILE
    if not no_resume and job_file.is_file():
        try:
            saved = json.loads(job_file.read_text())
        except (OSError, ValueError):
            saved = {}  # the job's own opening says what is wrong with it

    def value(field: str):
        given = values.get(field)
        given = saved.get(field) if given is None else given
        return ARG_BY_FIELD[field].default if given is None else given

    try:
        stage = STAGE_ORDER.index(Stage(saved.get("progress", Stage.BEGIN.value)))
    except ValueError:
        stage = 0
    passes = []
    if not value("reuse_measurement") and stage <= STAGE_ORDER.index(Stage.MEASURE):
        passes.append("measure")
    if not value("output_measurement") and stage <= STAGE_ORDER.index(Stage.QUANT):
        passes.append("quant")
    used = saved.get(ROWS_USED) or {}
    out: dict[str, int] = {}
    for which in passes:
        if which in used:
            out[which] = PlannedRows(int(used[which]), "job")
        elif value("cal_dataset"):
            out[which] = PlannedRows(int(value("measurement_rows" if which == "measure" else "dataset_rows")), "dataset")
        else:
            try:
                from exl2conv.model import load_config

                noise = noise_count(load_config(Path(value("in_dir")).expanduser()), which) if value("in_dir") else 0
            except (Exl2Error, OSError, ValueError):
                continue
            out[which] = PlannedRows(calibration.builtin_row_count(which) + noise, "builtin")
    return out


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
