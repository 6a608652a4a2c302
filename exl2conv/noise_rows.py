"""Noise rows: calibration rows that stand in for image embeddings (Qwen2-VL, Qwen2.5-VL).

ExLlamaV2 0.3.2 appends rows of token id -1 to its built-in calibration set, and to no parquet
set, for the architectures that set ``standard_calib_noise`` (5 rows to the measurement's, 30 to
the quantization's: conversion/tokenize.py, get_standard_calibration, called from
conversion/convert_exl2.py). Its embedding module then replaces every row whose first id is
negative by Gaussian noise whose mean and standard deviation are those of all the other rows'
embeddings, one scalar each over every element (embedding.py, ExLlamaV2Embedding.forward with
``negative_ids_noise``, called by conversion/measure.py, embeddings). The language model's
Hessians thus see, besides text, inputs that are not token embeddings, as the merger's image
embeddings are not.

We do the same (``ArchSpec.calib_noise``), deterministically where ExLlamaV2 is not: the
statistics are computed exactly, in float64, from the real rows when the rows are tokenized, and
saved beside the token ids; row r's noise comes from a generator seeded with ``NOISE_SEED + r``. So
every recomputation of the embeddings (a chunk of rows, a resume, another device) gives the same
values. As in ExLlamaV2, the noise is rounded to float16, the precision of every real embedding.
"""

from __future__ import annotations

import torch

NOISE_ID = -1
NOISE_SEED = 0x4E4F4953  # "NOIS"


def append(ids: torch.Tensor, count: int) -> torch.Tensor:
    """``ids`` [R, L] with ``count`` rows of :data:`NOISE_ID` after them."""
    return torch.cat([ids, ids.new_full((count, ids.shape[1]), NOISE_ID)])


def is_noise(ids: torch.Tensor) -> torch.Tensor:
    """[R] bool: the rows that are noise. ExLlamaV2 tests a row's first id only."""
    return ids[:, 0] < 0


def statistics(ids: torch.Tensor, table: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[2] float64: the mean and the standard deviation (n - 1 in the denominator, as ExLlamaV2's
    running update gives) of every element of the real rows' embeddings: ``table`` [V, H] rows
    times ``scale`` (``cfg.embed_scale``), ids at or above V read as 0 (forward.embed). Exact:
    each distinct token's row is summed once, weighted by how often the rows hold it."""
    real = ids[~is_noise(ids)].flatten()
    real = torch.where(real >= table.shape[0], 0, real).clamp(min=0)
    counts = torch.bincount(real.cpu(), minlength=table.shape[0])
    used = counts.nonzero().flatten()
    rows = table[used.to(table.device)].double().cpu() * scale
    weight = counts[used].double()
    n = float(weight.sum()) * table.shape[1]
    mean = float((weight * rows.sum(1)).sum()) / n
    var = float((weight * ((rows - mean) ** 2).sum(1)).sum()) / max(n - 1, 1)
    return torch.tensor([mean, var ** 0.5], dtype=torch.float64)


def fill(x: torch.Tensor, ids: torch.Tensor, first_row: int, stats: torch.Tensor) -> torch.Tensor:
    """``x`` [R, L, H] (the embeddings of ``ids`` [R, L], rows ``first_row``.. of their set) with
    every noise row replaced, in place, by its noise: N(mean, std) from :func:`statistics`,
    float32, rounded to float16. Returns ``x``."""
    mean, std = float(stats[0]), float(stats[1])
    for r in is_noise(ids).nonzero().flatten().tolist():
        g = torch.Generator().manual_seed(NOISE_SEED + first_row + r)
        noise = torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32) * std + mean
        x[r] = noise.half().to(device=x.device, dtype=x.dtype)
    return x
