"""The measures of a module's output error that the measurement and the quantization score by
(:func:`relative_errors`, weighted by :func:`error_weight`), and :func:`feed`, which hands a chunk's
intermediates to the accumulators that :func:`exl2conv.layers.run_block` fills beside them."""

from __future__ import annotations

import torch


def relative_errors(y: torch.Tensor, ref: torch.Tensor, err_weight: torch.Tensor | None,
                    fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row relative Frobenius error ``||g * (y - ref)|| / ||g * ref||`` of ``[B, L, H]``
    outputs, channels weighted by ``err_weight`` ``[H]`` when given; float64 ``[B]`` on the outputs'
    device (no host sync: callers collect them and copy once).
    With ``fisher`` ``[H]``, float64 ``[B, 2]``: the relative error and ``sum_{t,c} F[c] e[t, c]^2``
    of each row (half of it is the row's predicted KL, see :mod:`exl2conv.sensitivity`)."""
    return delta_errors(y - ref, ref, err_weight, fisher)


def delta_errors(d: torch.Tensor, ref: torch.Tensor, err_weight: torch.Tensor | None,
                 fisher: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`relative_errors` from the difference ``d = y - ref`` itself (an MoE block's
    measurement sums it expert by expert, :mod:`exl2conv.moe_measure`)."""
    cost = None if fisher is None else (d.square() * fisher).sum((1, 2)).double()
    r = ref
    if err_weight is not None:
        d, r = d * err_weight, r * err_weight
    num = torch.linalg.vector_norm(d.flatten(1), dim=1)
    den = torch.linalg.vector_norm(r.flatten(1), dim=1)
    rel = (num / den).double()
    return rel if cost is None else torch.stack([rel, cost], 1)


def feed(acc, value) -> None:
    """One chunk's intermediate into an accumulator (see :func:`exl2conv.layers.run_block`)."""
    if isinstance(value, list):
        for row in value:
            if row is not None:
                acc.add(row)
    else:
        acc.add_rows(value)


def error_weight(next_norm: torch.Tensor | None) -> torch.Tensor | None:
    """Channel weights for a module's output error: the weight of the RMSNorm that next reads
    the residual stream (absolute values). The next layer sees an error ``e`` in the residual as
    ``g * e / rms(x)``, so ``||g * e|| / ||g * y||`` is the relative error it actually receives.
    Unweighted, a few massive channels (SmolLM2 carries 24,000 in channel 507, where the norm
    weight is 3e-4) dominate ``||y||`` and make real errors look negligible."""
    return None if next_norm is None else next_norm.abs().to(torch.float32)
