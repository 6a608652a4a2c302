"""Revisiting a GPTQ result's rounding on EXL2's grid: exact coordinate descent of the codes.

GPTQ rounds greedily, one row at a time, each row's rounding final once made. :func:`descend`
revisits all of a linear's codes against the output error over the calibration rows, starting from
GPTQ's codes and keeping GPTQ's grid (groups, bits, per-column scale indices ``qs``, group maxima
``qscale_max``), so the result packs and decodes exactly as GPTQ's would
(:func:`exl2conv.pack.pack_linear`). The objective may also take the reference outputs from other
inputs than the ones the linear sees (``||X_q Q - X W||^2``: the quantized model's inputs, the
unquantized model's outputs).

Sign-gradient descent on per-weight rounding offsets (AutoRound, arXiv 2309.05516) was tried from
GPTQ's codes first and only raised this objective (docs/quality.md, session 22); the descent here
is exact per coordinate and cannot. Float32 arithmetic, no random numbers: the same inputs give the
same codes.
"""

from __future__ import annotations

import torch

from exl2conv.pack import dequant, dequant_scale
from exl2conv.qparams import Group

SWEEPS = 4
DAMP = 0.01     # of the mean Hessian diagonal: enough to keep dead input channels out of the fit


def grid_rows(groups: list[Group], qs: torch.Tensor, qscale_max: torch.Tensor, k: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (permuted) row's zero point and largest code, int32 ``[K, 1]``, and its columns' scales
    as the runtime decodes them, float16 ``[K, N]``: the EXL2 grid of one quantized linear.
    groups: the layout (:meth:`QParams.groups`); qs: int ``[G, N]``; qscale_max: ``[G]``."""
    sizes = [g.rows for g in groups]
    if sum(sizes) != k:
        raise ValueError(f"the groups cover {sum(sizes)} rows, the weight has {k}")
    bits = torch.tensor([g.bits for g in groups], dtype=torch.int64)
    counts = torch.tensor(sizes, dtype=torch.int64)
    row_bits = torch.repeat_interleave(bits, counts).to(qs.device)
    zero = (1 << (row_bits - 1)).to(torch.int32).unsqueeze(1)
    top = ((1 << row_bits) - 1).to(torch.int32).unsqueeze(1)
    scale = torch.repeat_interleave(dequant_scale(qs, qscale_max), counts.to(qs.device), dim=0)
    return zero, top, scale


def damped(h: torch.Tensor, cross: torch.Tensor | None = None, damp: float = DAMP
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h + l I`` and ``cross + l I`` with ``l = damp * mean(diag h)`` (new float32 tensors): the
    objective of :func:`descend` plus ``l ||Q - W||^2``, which keeps inputs that the rows barely
    exercise from steering their codes."""
    lam = damp * float(torch.diagonal(h).float().mean()) if h.numel() else 0.0
    out = []
    for m in (h, cross):
        if m is not None:
            m = m.to(torch.float32).clone()
            torch.diagonal(m).add_(lam)
        out.append(m)
    return out[0], out[1]


def descend(wt: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, top: torch.Tensor, scale: torch.Tensor,
            h: torch.Tensor, cross: torch.Tensor | None = None, sweeps: int = SWEEPS
            ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Codes on the same grid with a smaller output error, by exact coordinate descent.

    The objective is ``||X_q Q - X W||^2`` over the calibration rows (``Q``, ``W``: ``[K, N]``), given
    as ``h = X_q^T X_q`` and ``cross = X_q^T X`` (None: the same inputs, ``cross = h``, and the
    objective is ``tr(D^T h D)`` with ``D = Q - W``). It is a separate quadratic per output column,
    coupled across rows by ``h``: with every other code fixed, row ``k``'s best code in a column is
    the nearest one to ``c_k - G_k / (h_kk s_k)`` with ``G = h Q - cross W`` (a one-dimensional
    parabola), clamped to the row's range. One sweep visits the rows in order, all columns at once,
    and keeps ``G`` current with a rank-one update per changed row: the objective never rises.

    wt: float32 ``[K, N]``, the unquantized weight in the rows' order; codes: int ``[K, N]``, the
    start (GPTQ's); zero, top, scale: the grid (:func:`grid_rows`); h, cross: float32 ``[K, K]`` in
    the same row order (damp both alike: :func:`damped`).
    Returns ``(codes int16 [K, N], dequantized float32 [K, N] as the runtime decodes them, objective
    before, objective after)``, the objectives less that of ``W`` itself (float64 sums)."""
    wt = wt.to(torch.float32)
    h = h.to(torch.float32)
    cross = h if cross is None else cross.to(torch.float32)
    s = scale.to(torch.float32)
    z = zero.to(torch.float32)
    hi = top.to(torch.float32)
    c = codes.to(torch.float32).clone()
    g = h @ ((c - z) * s) - cross @ wt  # G, kept current
    diag = torch.diagonal(h)
    for _ in range(sweeps):
        for k in range(c.shape[0]):
            if diag[k] <= 0:  # an input that never fires: its codes change nothing
                continue
            best = torch.clamp(torch.round(c[k] - g[k] / (diag[k] * s[k])), min=0.0).minimum(hi[k])
            step = (best - c[k]) * s[k]
            # on a GPU a zero update costs less than the host sync that would skip it (and
            # adds exact zeros); on a CPU skipping saves the product
            if c.is_cuda or bool(step.any()):
                g.addr_(h[:, k], step)
                c[k] = best
    out = c.to(torch.int16)
    q = dequant(out, zero, scale).to(torch.float32)
    q0 = dequant(codes, zero, scale).to(torch.float32)
    return out, q, objective(wt, q0, h, cross), objective(wt, q, h, cross)


def objective(wt: torch.Tensor, q: torch.Tensor, h: torch.Tensor, cross: torch.Tensor) -> float:
    """``tr(Q^T h Q) - 2 tr(Q^T cross W)`` less its value at ``Q = W`` (float64): for ``cross = h``
    the output error ``tr(D^T h D)``."""
    w64, q64, h64, c64 = (t.to(torch.float64) for t in (wt, q, h, cross))
    def f(x):
        return float((x * (h64 @ x)).sum() - 2 * (x * (c64 @ w64)).sum())
    return f(q64) - f(w64)
