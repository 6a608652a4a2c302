"""The candidate forwards of the measurement pass, computed as corrections to the reference.

Each row of a module's option table runs the module with quantized weights ``W + dW`` over all
calibration states and scores the output against the unquantized one (reference 3.4-3.5). Run
directly, that is 17-19 float32 forwards per module, most of a GPU measurement's time. Every linear
is instead computed from its recorded reference input and output:

    y = Y_ref + (x - X_ref) W^T + x dW^T

which is the same linear map (biases are not quantized, so they sit in ``Y_ref``). The first
correction vanishes for the linears fed by the module's input norm (q/k/v, gate/up), whose input
does not depend on the candidate. Both corrections are small next to ``Y_ref``, so they run in
bfloat16 on tensor cores: their rounding is relative to the correction, i.e. to the error being
measured, not to the output. The error of a candidate therefore comes out with about three
significant digits, where a float32 recompute of the whole output would be ~8x slower.

The recorded inputs and outputs of every linear for every calibration row must fit on the device
(about 5 GiB for a Llama-2-7B MLP at the default 16 x 2048 rows); when they do not, or on a CPU,
:class:`CandidateScorer` runs the plain float32 forwards (:func:`layers.run_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exl2conv.layers import block_forward, relative_errors, run_block
from exl2conv.model.forward import LINEAR_HOOK, NORMED_INPUT

LOW = torch.bfloat16
FIT_FRACTION = 0.5  # of the device's free memory that the recording may take


class _Recorder:
    """Forward hook that computes each linear as usual and keeps its input and output."""

    def __init__(self):
        self.io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, w: dict, key: str) -> torch.Tensor:
        y = F.linear(x, w[key], w.get(f"{key}.bias"))
        self.io[key] = (x, y)
        return y


class _Corrected:
    """Forward hook that computes each linear from the recording plus the two corrections.
    ``fixed``: the linears whose input is the module's own normed input, which no candidate
    changes (the forward recomputes it from the same states and norm weight, bit for bit): they
    skip the first correction. The others always take it; it is exactly zero where the input
    happens not to have changed. (An equality test instead cost a host sync per linear call.)"""

    def __init__(self, io: dict, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], low: torch.dtype,
                 fixed: dict[str, torch.Tensor] | None = None):
        self.io, self.base, self.delta, self.low = io, base, delta, low
        self.fixed = fixed or {}  # key -> its recorded input in ``low``

    def __call__(self, x: torch.Tensor, w: dict, key: str) -> torch.Tensor:
        x_ref, y = self.io[key]
        x_low = self.fixed.get(key)
        if x_low is None:
            if x is not x_ref:
                y = y + F.linear((x - x_ref).to(self.low), self.base[key])  # promoted: exact float32 sum
            x_low = x.to(self.low)
        if key in self.delta:
            y = y + F.linear(x_low, self.delta[key])
        return y


def _unique_bytes(io: dict) -> int:
    seen, total = set(), 0
    for pair in io.values():
        for t in pair:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


class CandidateScorer:
    """Scores candidate weights of one module against its reference outputs.

    states: ``[R, L, H]`` module inputs; w: the module's unquantized float32 weights; linears: the
    keys of ``w`` that candidates replace; y_ref: ``[R, L, H]`` reference outputs. ``corrected``:
    None decides by device and memory (CUDA and the recording fits), True/False forces it (tests);
    ``low``: the dtype of the corrections."""

    def __init__(self, kind: str, states: torch.Tensor, w: dict, linears, cfg, rope, chunk: int,
                 y_ref: torch.Tensor, err_weight: torch.Tensor | None = None, corrected: bool | None = None,
                 low: torch.dtype = LOW, fisher: torch.Tensor | None = None):
        self.kind, self.states, self.w, self.cfg, self.rope, self.chunk = kind, states, w, cfg, rope, chunk
        self.linears = list(linears)
        # linears given with their specs: those fed by the module's input norm (see _Corrected)
        self.fixed = frozenset(key for key, spec in linears.items() if spec.hessian_input == NORMED_INPUT) \
            if isinstance(linears, dict) else frozenset()
        self.y_ref, self.err_weight, self.low, self.fisher = y_ref, err_weight, low, fisher
        self.ios: list[dict] = []
        if corrected is None:
            corrected = states.is_cuda
        if corrected:
            corrected = self._record(check_fit=states.is_cuda)
        self.corrected = corrected
        if corrected:
            self.base = {key: w[key].to(low) for key in self.linears}
            # the fixed linears' inputs in ``low``, converted once for all candidates (q/k/v share one)
            self.lows: list[dict[str, torch.Tensor]] = []
            for io in self.ios:
                by_ptr: dict[int, torch.Tensor] = {}
                for key in self.fixed & io.keys():
                    x_ref = io[key][0]
                    if x_ref.data_ptr() not in by_ptr:
                        by_ptr[x_ref.data_ptr()] = x_ref.to(low)
                self.lows.append({key: by_ptr[io[key][0].data_ptr()] for key in self.fixed & io.keys()})

    def _record(self, check_fit: bool) -> bool:
        rows = self.states.shape[0]
        budget = None
        if check_fit:
            free, _ = torch.cuda.mem_get_info(self.states.device)
            budget = FIT_FRACTION * free
        for r0 in range(0, rows, self.chunk):
            rec = _Recorder()
            wr = dict(self.w)
            wr[LINEAR_HOOK] = rec
            with torch.no_grad():
                block_forward(self.kind, self.states[r0:r0 + self.chunk], wr, self.cfg, self.rope)
            self.ios.append(rec.io)
            if budget is not None and r0 == 0:
                chunks = -(-rows // self.chunk)
                if _unique_bytes(rec.io) * chunks > budget:
                    self.ios.clear()
                    return False
        return True

    def errors(self, trial: dict) -> torch.Tensor:
        """Per-row relative errors (float64 ``[R]``; left on the states' device by the corrected
        forwards, on the CPU otherwise) of the module with ``trial``'s weights; with ``fisher``,
        ``[R, 2]``: also each row's Fisher-weighted squared error (see
        :func:`layers.relative_errors`)."""
        if not self.corrected:
            return run_block(self.kind, self.states, trial, self.cfg, self.rope, self.chunk, ref=self.y_ref,
                             keep_output=False, err_weight=self.err_weight, fisher=self.fisher)[1]
        delta = {key: (trial[key].to(torch.float32) - self.w[key]).to(self.low) for key in self.linears}
        out = []
        for i, r0 in enumerate(range(0, self.states.shape[0], self.chunk)):
            wc = dict(trial)
            wc[LINEAR_HOOK] = _Corrected(self.ios[i], self.base, delta, self.low, self.lows[i])
            with torch.no_grad():
                y, _ = block_forward(self.kind, self.states[r0:r0 + self.chunk], wc, self.cfg, self.rope)
            out.append(relative_errors(y, self.y_ref[r0:r0 + self.chunk], self.err_weight, self.fisher))
        return torch.cat(out)
