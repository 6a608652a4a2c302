"""Mixture-of-experts bookkeeping: how well the calibration data covers each expert of a layer.

A router sends each token to a few experts, so an expert may see few or none of a row's tokens;
its w2 Hessian then rests on little data (an expert that sees no rows at all gets the identity).
ExLlamaV2 counts, per expert, the rows in which it is "uncalibrated" and warns when that is more
than a fifth of the rows (its conversion/measure.py, measure_quant, and conversion/quantize.py,
quant). This module counts the same way; the stages print.
"""

from __future__ import annotations

import torch

# An expert is uncalibrated in a row when it got fewer than 1/MIN_SHARE_DIVISOR of the row's
# tokens (a tenth)...
MIN_SHARE_DIVISOR = 10
# ...and a warning is due when that holds in more than this share of the rows.
MAX_UNCALIBRATED_ROWS = 0.2
# Up to this many experts the report lists each one; beyond (Qwen3-MoE's 128), it summarizes, so
# that a layer stays one line. With 128 experts and 8 per token an expert's average share is 1/16,
# below ExLlamaV2's tenth: most experts of such a model are flagged by its rule, kept here as it is.
LISTED_EXPERTS = 16


def uncalibrated(counts: torch.Tensor, length: int) -> torch.Tensor:
    """counts: int ``[B, E]`` tokens routed to each expert in each row of ``length`` tokens ->
    bool ``[B, E]``: the expert got no token, or fewer than a tenth of the row's tokens
    (``count < length / 10``, compared in integers so that it is exact)."""
    return (counts == 0) | (counts * MIN_SHARE_DIVISOR < length)


class ExpertCoverage:
    """Accumulates, over calibration rows, each expert's routed tokens and uncalibrated rows.
    Fed like a Hessian by :func:`exl2conv.layers.run_block`, with the forward's
    ``EXPERT_TOKENS`` intermediate."""

    def __init__(self, name: str, num_experts: int, length: int):
        self.name, self.length = name, length
        self.rows = 0
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)
        self.uncalibrated = torch.zeros(num_experts, dtype=torch.int64)

    def add_rows(self, counts: torch.Tensor) -> None:
        """counts: int ``[B, E]``, B more rows."""
        counts = counts.to("cpu", torch.int64)
        self.rows += counts.shape[0]
        self.tokens += counts.sum(0)
        self.uncalibrated += uncalibrated(counts, self.length).sum(0)

    def flagged(self) -> list[int]:
        """Experts uncalibrated in more than 20% of the rows."""
        limit = self.rows * MAX_UNCALIBRATED_ROWS
        return [j for j, n in enumerate(self.uncalibrated.tolist()) if n > limit]

    def summary(self) -> str:
        """One line: the share of the calibration tokens routed to each expert, and the rows in
        which each was uncalibrated (for more than :data:`LISTED_EXPERTS` experts, their range)."""
        total = max(self.rows * self.length, 1)
        if len(self.tokens) > LISTED_EXPERTS:
            shares, bad = 100 * self.tokens.double() / total, self.uncalibrated
            return (f"{self.name}: calibration tokens routed to each of {len(self.tokens)} experts: "
                    f"{shares.min():.1f}% to {shares.max():.1f}% (mean {shares.mean():.1f}%), "
                    f"{int((self.tokens == 0).sum())} got none; per expert, the rows in which it got under "
                    f"1/{MIN_SHARE_DIVISOR} of the tokens: {int(bad.min())} to {int(bad.max())} (of {self.rows})")
        shares = " ".join(f"{100 * t / total:.0f}%" for t in self.tokens.tolist())
        short = " ".join(str(n) for n in self.uncalibrated.tolist())
        return (f"{self.name}: calibration tokens routed to experts 0..{len(self.tokens) - 1}: {shares}; "
                f"rows in which each got under 1/{MIN_SHARE_DIVISOR} of the tokens: {short} (of {self.rows})")

    def warning(self) -> str | None:
        """One line naming the under-calibrated experts, or None when every expert is covered."""
        bad = self.flagged()
        if not bad:
            return None
        counts = ", ".join(f"{self.uncalibrated[j]}/{self.rows}" for j in bad)
        which = ", ".join(str(j) for j in bad)
        if len(bad) > LISTED_EXPERTS:  # the first few, and the worst count
            shown = LISTED_EXPERTS // 2
            which = (f"{', '.join(str(j) for j in bad[:shown])} and {len(bad) - shown} more "
                     f"({len(bad)} of {len(self.tokens)})")
            counts = f"up to {int(self.uncalibrated.max())}/{self.rows}"
        return (f"{self.name}: expert{'s' if len(bad) > 1 else ''} {which} got under 1/{MIN_SHARE_DIVISOR} "
                f"of a row's tokens in more than {MAX_UNCALIBRATED_ROWS:.0%} of the calibration rows "
                f"({counts} rows), so {'their' if len(bad) > 1 else 'its'} weights are quantized on little "
                "data; more or longer calibration rows (-r/-l, -mr/-ml) would cover "
                f"{'them' if len(bad) > 1 else 'it'} better")


def report_coverage(rep, cov: ExpertCoverage) -> None:
    """Print the coverage line and, where due, the warning through a :class:`Reporter`."""
    rep.info(cov.summary())
    warning = cov.warning()
    if warning:
        rep.warn(warning)
