"""The calibration rows divided among the ranks of a job on several devices (docs/distributed.md):
each rank holds and runs only its own rows (:meth:`World.row_range`), and what a pass sums over
rows is summed over the ranks here, in rank order, so that no result depends on timing.

- Hessians (``X^T X`` and their row counts) and an MoE block's expert coverage: summed
  (:func:`reduce_hessians`, :func:`reduce_coverage`);
- per-row errors (the measurement's table, the quantized module's relative errors): gathered
  into the whole set's row order (:func:`gather_errors`), so that their means are one process's
  means of the same values;
- the first rows of the set (norm tweaking's rows): gathered from the ranks that hold them
  (:func:`first_rows`), for rank 0, which alone tweaks;
- float64 sums (the calibration perplexity's log-likelihood): :func:`sum_values`.

Under one process (:data:`distributed.SINGLE`) every function returns its input unchanged.
"""

from __future__ import annotations

import torch

from exl2conv import distributed
from exl2conv.gptq import Hessian


def reduce_hessians(world: distributed.World, hess: dict, what: str) -> None:
    """Every accumulator of ``hess`` (:class:`Hessian`, name -> accumulator) summed over the
    ranks in place, in rank order, with its row count: each rank then holds the whole set's."""
    if not world.shared:
        return
    accumulators = [h for h in hess.values() if isinstance(h, Hessian)]
    rows = torch.tensor([float(h.rows) for h in accumulators], dtype=torch.float64)
    world.sum_in_order(rows, f"the row counts of {what}")
    for h, n in zip(accumulators, rows.tolist()):
        world.sum_in_order(h.h, f"the Hessians of {what}")
        h.rows = int(n)


def reduce_coverage(world: distributed.World, cov, what: str) -> None:
    """An MoE block's :class:`moe.ExpertCoverage` summed over the ranks (integers: exact)."""
    if not world.shared:
        return
    counts = torch.stack([cov.tokens, cov.uncalibrated,
                          torch.full_like(cov.tokens, cov.rows)]).to(torch.int64)
    world.sum_in_order(counts, f"the expert coverage of {what}")
    cov.tokens, cov.uncalibrated, cov.rows = counts[0].clone(), counts[1].clone(), int(counts[2, 0])


def gather_errors(world: distributed.World, errs: torch.Tensor, what: str, dim: int = 0) -> torch.Tensor:
    """Per-row errors of this rank's rows (rows along ``dim``) -> the whole set's, in row order."""
    if not world.shared:
        return errs
    moved = errs.movedim(dim, 0).contiguous()
    return world.gather_rows(moved, f"the errors of {what}").movedim(0, dim)


def first_rows(world: distributed.World, states: torch.Tensor, count: int, what: str,
               to_main: bool = False) -> torch.Tensor | None:
    """The set's first ``count`` rows ``[count, L, H]`` on every rank (rank 0 alone with
    ``to_main``: the others get None), from this rank's rows ``states``: each rank sends at most
    ``count`` of its own (the slices are in rank order)."""
    if not world.shared:
        return states[:count]
    rows = world.gather_rows(states[:count].contiguous(), f"the first rows of {what}", to_main=to_main)
    return None if rows is None else rows[:count]


def sum_values(world: distributed.World, values: list[float], what: str) -> list[float]:
    """Float64 sums of ``values`` over the ranks, added in rank order."""
    if not world.shared:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    return world.sum_in_order(t, what).tolist()
