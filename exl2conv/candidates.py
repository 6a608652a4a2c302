"""The candidate forwards of the measurement pass, computed as corrections to the reference.

Each row of a module's option table runs the module with quantized weights ``W + dW`` over all
calibration states and scores the output against the unquantized one (ExLlamaV2's
conversion/measure.py: measure_attn, measure_mlp and measure_moe_mlp, with test_error). Run directly,
that is 17-19 float32 forwards per module, most of a GPU measurement's time. Every linear is
instead computed from its recorded reference input and output:

    y = Y_ref + (x - X_ref) W^T + x dW^T

which is the same linear map (biases are not quantized, so they sit in ``Y_ref``). The first
correction vanishes for the linears fed by the module's input norm (q/k/v, gate/up), whose input
does not depend on the candidate. Both corrections are small next to ``Y_ref``, so they run in
bfloat16 on tensor cores: their rounding is relative to the correction, i.e. to the error being
measured, not to the output. The error of a candidate therefore comes out with about three
significant digits, where a float32 recompute of the whole output would be ~8x slower.

The measurement scores a module's whole table one chunk of rows at a time, so that only that
chunk's recorded inputs and outputs are held (a Llama-2-7B MLP records about 5 GiB over the default
16 x 2048 rows, 0.65 GiB per chunk of 2 rows); when a chunk's recording does not fit on the device,
or on a CPU, :class:`CandidateScorer` runs the plain float32 forwards (:func:`layers.run_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exl2conv import stop
from exl2conv.coded import Coded
from exl2conv.layers import ModuleRun, run_block
from exl2conv.memory import Prefetch
from exl2conv.metrics import relative_errors
from exl2conv.model.forward import NORMED_INPUT, plain_linear

LOW = torch.bfloat16
FIT_FRACTION = 0.5  # of the device's free memory that the recording may take


class _Recorder:
    """Forward hook that computes each linear as usual and keeps its input and output."""

    def __init__(self):
        self.io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, w: dict, key: str) -> torch.Tensor:
        y = plain_linear(x, w, key)
        self.io[key] = (x, y)
        return y


class _Corrected:
    """Forward hook that computes each linear from the recording plus the two corrections.
    ``fixed``: the linears whose input is the module's own normed input, which no candidate
    changes (the forward recomputes it from the same states and norm weight, bit for bit): they
    skip the first correction. The others always take it; it is exactly zero where the input
    happens not to have changed. (An equality test instead cost a host sync per linear call.)"""

    def __init__(self, io: dict, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], low: torch.dtype,
                 fixed: dict[str, torch.Tensor] | None = None, frozen: frozenset = frozenset()):
        self.io, self.base, self.delta, self.low = io, base, delta, low
        self.fixed = fixed or {}  # key -> its recorded input in ``low``
        self.frozen = frozen

    def __call__(self, x: torch.Tensor, w: dict, key: str) -> torch.Tensor:
        x_ref, y = self.io[key]
        if key in self.frozen:
            return y
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

    run: the module, its unquantized weights (float32, or a linear's held in its float16 or
    bfloat16 source dtype, :meth:`WeightIndex.held_dtype`), ``run.specs`` the linears that
    candidates replace (a trial gives each such key a tensor or a :class:`coded.Coded` weight), and
    ``run.device`` where the module runs (default: the states' device); states: ``[R, L, H]``
    module inputs; y_ref: ``[R, L, H]`` reference outputs. ``corrected``: None decides by device
    and memory (CUDA and a recording fits), True/False forces it (tests); ``low``: the dtype of
    the corrections.

    Scoring runs chunk of rows by chunk (:meth:`errors_table`; :meth:`errors` scores one trial).
    Without ``table``, every chunk's recording is made here and held for all calls: for MoE blocks,
    scored one row at a time because their experts' candidates stay in host memory. With
    ``table``, only the first chunk is recorded here (to see that one fits), and each chunk is
    recorded just before it is scored and freed after, so that one chunk's recording is held at a
    time (a Llama-2-7B MLP records about 5 GiB over 16 rows of 2048 tokens): for scoring a whole
    table in one call. Both give the same bits."""

    def __init__(self, run: ModuleRun, states: torch.Tensor, y_ref: torch.Tensor,
                 err_weight: torch.Tensor | None = None, corrected: bool | None = None, low: torch.dtype = LOW,
                 fisher: torch.Tensor | None = None, table: bool = False, frozen: frozenset = frozenset()):
        self.device = run.device or states.device
        self.run = run.replace(device=self.device)
        self.states, self.w, self.chunk = states, run.weights, run.chunk
        self.linears = list(run.specs)
        # the module's other linears, in a branch that no candidate's input reaches (a parallel
        # block's MLP while its attention is measured, and the reverse): their recorded outputs
        # stand as they are
        self.frozen = frozen
        # those fed by the module's input norm (see _Corrected)
        self.fixed = frozenset(key for key, spec in run.specs.items() if spec.hessian_input == NORMED_INPUT)
        self.y_ref, self.err_weight, self.low, self.fisher = y_ref, err_weight, low, fisher
        self.table = table
        self.recorded: list[tuple[dict, dict]] = []  # per chunk: (linear io, fixed inputs in ``low``)
        if corrected is None:
            corrected = self.device.type == "cuda"
        if corrected:
            corrected = self._record_all(check_fit=self.device.type == "cuda")
        self.corrected = corrected
        if corrected:  # for the first correction, which the fixed linears skip
            self.base = {key: self.w[key].to(low) for key in self.linears if key not in self.fixed}

    def _chunks(self) -> range:
        return range(0, self.states.shape[0], self.chunk)

    def _rows(self, t: torch.Tensor, r0: int) -> torch.Tensor:
        """Rows ``r0 ..`` of a chunk of ``t`` (states or reference outputs) on the device."""
        return t[r0:r0 + self.chunk].to(self.device, non_blocking=True)

    def _record(self, r0: int, x: torch.Tensor | None = None) -> tuple[dict, dict]:
        """One chunk's recording: every linear's input and output, and the fixed linears' inputs
        in ``low`` (converted once for all candidates; q/k/v share one). x: the chunk's states
        on the device, when the caller has them."""
        rec = _Recorder()
        with torch.no_grad():
            self.run.replace(hook=rec).forward(self._rows(self.states, r0) if x is None else x)
        by_ptr: dict[int, torch.Tensor] = {}
        lows = {}
        for key in sorted(self.fixed & rec.io.keys()):
            x_ref = rec.io[key][0]
            if x_ref.data_ptr() not in by_ptr:
                by_ptr[x_ref.data_ptr()] = x_ref.to(self.low)
            lows[key] = by_ptr[x_ref.data_ptr()]
        return rec.io, lows

    def _record_all(self, check_fit: bool) -> bool:
        """Records every chunk (only the first with ``table``); False, keeping nothing, when what
        would be held at once is over :data:`FIT_FRACTION` of the device's free memory."""
        budget = None
        if check_fit:
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = FIT_FRACTION * free
        for r0 in self._chunks():
            self.recorded.append(self._record(r0))
            if r0 == 0 and budget is not None:
                held = 1 if self.table else len(self._chunks())
                if _unique_bytes(self.recorded[0][0]) * held > budget:
                    self.recorded.clear()
                    return False
            if self.table:
                break
        return True

    def _converted(self, trial: dict, memo: dict, fn) -> dict[str, torch.Tensor]:
        """``fn(key, candidate)`` of each candidate linear of ``trial``, reusing the last trial's
        result for a key whose candidate is the same tensor (table rows share most columns)."""
        out = {}
        for key in self.linears:
            src = trial[key]
            if key not in memo or memo[key][0] is not src:
                memo[key] = (src, fn(key, src))
            out[key] = memo[key][1]
        return out

    def _dense(self, src, codes: "_Codes | None" = None) -> torch.Tensor:
        """A candidate as a tensor on the device (a :class:`Coded` one decoded, its codes taken
        from ``codes`` when given)."""
        if isinstance(src, Coded):
            return src.decode(codes.get(src) if codes is not None else None)
        return src.to(self.device)

    def _plain(self, key: str, src) -> torch.Tensor:
        return self._dense(src).to(torch.float32)

    def _delta(self, key: str, src, codes: "_Codes | None" = None) -> torch.Tensor:
        base = self.w[key]
        if isinstance(src, Coded):
            got = codes.get(src) if codes is not None else None
            if self.low == torch.bfloat16:  # one kernel where it runs, else its reference: the same bits
                return src.delta(base, got)
            dense = src.decode(got)
        else:
            dense = src.to(self.device)
        if base.dtype != torch.float32:  # parked in 2 bytes: a float16 difference would round
            return dense.to(torch.float32).sub_(base).to(self.low)
        # the subtraction widens a float16 candidate exactly: no float32 copy of it first
        return torch.sub(dense, base).to(self.low)

    def _chunk_errors(self, x: torch.Tensor, y_ref: torch.Tensor, recorded: tuple[dict, dict], trial: dict,
                      delta: dict) -> torch.Tensor:
        io, lows = recorded
        hook = _Corrected(io, self.base, delta, self.low, lows, self.frozen)
        with torch.no_grad():
            y, _ = self.run.replace(hook=hook).forward(x, trial)
        return relative_errors(y, y_ref, self.err_weight, self.fisher)

    def errors(self, trial: dict) -> torch.Tensor:
        """Per-row relative errors (float64 ``[R]``; left on the states' device by the corrected
        forwards, on the CPU otherwise) of the module with ``trial``'s weights (the candidate
        linears in any float dtype and on any device); with ``fisher``, ``[R, 2]``: also each row's
        Fisher-weighted squared error (see :func:`metrics.relative_errors`)."""
        return self.errors_table([trial])[0]

    def errors_table(self, trials: list[dict]) -> torch.Tensor:
        """:meth:`errors` of every trial, ``[T, R]`` (or ``[T, R, 2]``). The corrected forwards run
        chunk by chunk: each chunk is scored against every trial, recorded just before and freed
        after when the scorer was built with ``table``; the arithmetic of a chunk and a trial is the
        same either way."""
        memo: dict = {}
        if not self.corrected:
            return torch.stack([
                run_block(self.run.replace(weights={**trial, **self._converted(trial, memo, self._plain)}), self.states,
                          ref=self.y_ref, keep_output=False, err_weight=self.err_weight, fisher=self.fisher)[1]
                for trial in trials])
        rows = self.states.shape[0]
        shape = (len(trials), rows) if self.fisher is None else (len(trials), rows, 2)
        out = torch.empty(shape, dtype=torch.float64, device=self.device)
        for i, r0 in enumerate(self._chunks()):
            order = self._decode_order(trials, memo)
            x, y_ref = self._rows(self.states, r0), self._rows(self.y_ref, r0)
            if not self.table:
                recorded = self.recorded[i]
            elif i == 0 and self.recorded:
                recorded = self.recorded.pop()
            else:
                recorded = self._record(r0, x)
            codes = _Codes(order, self.device)
            delta = lambda key, src: self._delta(key, src, codes)  # noqa: E731
            for t, trial in enumerate(trials):
                stop.check()
                out[t, r0:r0 + self.chunk] = self._chunk_errors(x, y_ref, recorded, trial,
                                                                self._converted(trial, memo, delta))
            del recorded, x, y_ref, codes
        return out

    def _decode_order(self, trials: list[dict], memo: dict) -> list[Coded]:
        """The :class:`Coded` candidates whose codes live in host memory, in the order in which a
        chunk's pass over ``trials`` decodes them (:meth:`_converted` with ``memo`` as it stands:
        each where its key's candidate changes)."""
        order, last = [], {key: got[0] for key, got in memo.items()}
        for trial in trials:
            for key in self.linears:
                src = trial[key]
                if last.get(key) is not src:
                    last[key] = src
                    if isinstance(src, Coded) and src.codes.device != self.device:
                        order.append(src)
        return order


class _Codes:
    """The codes of host-memory :class:`Coded` candidates, copied to the GPU in the order in
    which they are decoded (:class:`memory.Prefetch`)."""

    def __init__(self, order: list[Coded], device: torch.device):
        self.order, self.pos = order, 0
        self.copies = Prefetch([c.codes for c in order], device) if order and device.type == "cuda" else None

    def get(self, src: Coded) -> torch.Tensor | None:
        """``src``'s codes on the device (None where it is not next in the order: decode copies them)."""
        if self.copies is None or self.pos >= len(self.order) or self.order[self.pos] is not src:
            return None
        self.pos += 1
        return self.copies.take()
