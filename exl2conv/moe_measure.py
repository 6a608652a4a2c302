"""An MoE block's measurement, expert by expert: what each row of the option table does to the
block's output, at a cost that grows with the tokens routed to the experts and with memory that
holds one expert's candidates at a time.

Every row of the table applies one setting per column (gate, up, down) to all the experts
(ExLlamaV2's conversion/measure.py, measure_moe_mlp), and the router reads the block's input, which
no candidate changes: the routes are those of the reference pass. So the output error of a row is
a sum over experts of each expert's own change on its own tokens,

    y_row - y_ref = sum_j  weight_tj * (expert_j,row(n_t) - expert_j(n_t)),

which is accumulated expert by expert in a float32 buffer ``[rows, tokens, hidden]``: an expert is
quantized with the settings the table uses (GPTQ, on the device), run on its tokens once per
distinct gate and up setting and once per row for the down projection, and let go. Rows of the
table are taken in groups whose buffers fit the device (:func:`row_groups`); a second group
quantizes each expert again, with that group's settings only.

ExLlamaV2 instead keeps every expert's every candidate (its options_g/u/d lists) and reruns the
whole block per row: 16 GiB of candidates per layer of a Qwen3-30B-A3B, 64 GiB of a Qwen3-235B.
"""

from __future__ import annotations

import torch

from exl2conv import distributed, shared_rows, stop
from exl2conv.gptq import Prepared
from exl2conv.layers import ModuleRun, gptq_passes
from exl2conv.metrics import delta_errors
from exl2conv.model.arch import LinearSpec, spec_of
from exl2conv.model.forward import ACTIVATIONS, moe_routes

# Of the device's free memory, the share the rows' error buffers may take.
BUFFER_FRACTION = 0.4
# Where the module runs on the CPU (tests, small models): the buffers' cap.
CPU_BUFFER_BYTES = 4 << 30


def dense_candidates(w: torch.Tensor, spec: LinearSpec, prep: Prepared, settings: list) -> list[torch.Tensor]:
    """Each of ``settings`` applied to one linear (``w``: its ``[out, in]`` weight) by GPTQ, as
    float32 ``[out, in]`` weights on ``w``'s device (the dequantized values, exact in float16)."""
    out = []
    for batch in gptq_passes(w, spec, prep, settings):
        out.extend(res.weight[:, :spec.out_features].T.contiguous() for res in batch)
        del batch
    return out


def row_groups(rows: int, bytes_per_row: int, device: torch.device) -> list[range]:
    """The table's rows in consecutive groups whose error buffers (``bytes_per_row`` each) fit
    :data:`BUFFER_FRACTION` of the device's free memory (on the CPU, :data:`CPU_BUFFER_BYTES`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = BUFFER_FRACTION * free
    else:
        budget = CPU_BUFFER_BYTES
    size = max(1, min(rows, int(budget // max(bytes_per_row, 1))))
    return [range(r0, min(rows, r0 + size)) for r0 in range(0, rows, size)]


class _Routes:
    """The block's routing of every calibration token, on the device: the experts' input ``n``
    ``[T, H]`` f32, and for each expert the tokens it gets and their routing weights."""

    def __init__(self, run: ModuleRun, states: torch.Tensor, device: torch.device):
        parts = []
        for r0 in range(0, states.shape[0], run.chunk):
            with torch.no_grad():
                parts.append(moe_routes(states[r0:r0 + run.chunk].to(device), run.weights, run.cfg))
        self.n = torch.cat([p[0] for p in parts])
        self.weights = torch.cat([p[1] for p in parts])
        self.experts = torch.cat([p[2] for p in parts])

    def of(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices int64 [T_j], routing weights f32 [T_j, 1]) of expert ``j``."""
        tok, slot = torch.where(self.experts == j)
        return tok, self.weights[tok, slot, None]


def table_errors(run: ModuleRun, states: torch.Tensor, y_ref: torch.Tensor, factors,
                 columns: dict[str, list], rows: list[dict[str, int]], err_weight: torch.Tensor | None,
                 fisher: torch.Tensor | None) -> torch.Tensor:
    """The errors of each row of an MoE block's option table, as :meth:`CandidateScorer.errors_table`
    gives them for a dense module: float64 ``[len(rows), R]`` (``[len(rows), R, 2]`` with
    ``fisher``) on the CPU. run: the block (its experts' weights keyed "w1.<j>" etc., any float
    dtype); states, y_ref: ``[R, L, H]`` inputs and reference outputs; factors: the reference
    pass's :class:`measure.Factors` (each let go once its last use is done); columns: each
    column's ("w1", "w3", "w2") distinct settings; rows: the table, each row a setting index per
    column. Where several ranks share the job, ``states`` are this rank's calibration rows: it
    scores every row of the table on them (quantizing every expert with every setting the table
    uses, as one process does) and the errors are gathered into the whole set's row order."""
    errs = _rows_errors(run, states, y_ref, factors, columns, rows, err_weight, fisher)
    return shared_rows.gather_errors(distributed.active(), errs, "an MoE block", dim=1)


def _rows_errors(run: ModuleRun, states: torch.Tensor, y_ref: torch.Tensor, factors, columns: dict[str, list],
                 rows: list[dict[str, int]], err_weight: torch.Tensor | None,
                 fisher: torch.Tensor | None) -> torch.Tensor:
    """:func:`table_errors` of ``rows``, all on this rank."""
    dev = run.device or states.device
    r_count, length, hidden = states.shape
    act = ACTIVATIONS[spec_of(run.cfg).act]
    routes = _Routes(run, states, dev)
    shape = (len(rows), r_count) if fisher is None else (len(rows), r_count, 2)
    out = torch.empty(shape, dtype=torch.float64, device=dev)
    groups = row_groups(len(rows), r_count * length * hidden * 4, dev)
    for g, group in enumerate(groups):
        delta = torch.zeros(len(group), r_count * length, hidden, dtype=torch.float32, device=dev)
        for j in range(run.cfg.num_experts):
            stop.check()
            _add_expert(run, j, routes, factors, columns, [rows[r] for r in group], delta, act)
            if g == len(groups) - 1:
                for short in columns:
                    factors.done(f"{short}.{j}")
        for i, r in enumerate(group):
            for b0 in range(0, r_count, run.chunk):
                b1 = min(r_count, b0 + run.chunk)
                d = delta[i, b0 * length:b1 * length].view(b1 - b0, length, hidden)
                out[r, b0:b1] = delta_errors(d, y_ref[b0:b1].to(dev), err_weight, fisher)
        del delta
    return out.cpu()


def _add_expert(run: ModuleRun, j: int, routes: _Routes, factors, columns: dict[str, list],
                rows: list[dict[str, int]], delta: torch.Tensor, act) -> None:
    """Expert ``j``'s change of the block's output under each of ``rows``, added into ``delta``
    ``[len(rows), T, H]`` at its tokens. An expert that no token reached changes nothing."""
    tok, weight = routes.of(j)
    if tok.numel() == 0:
        return
    keys = {short: f"{short}.{j}" for short in columns}
    wts = {short: run.weights[key].to(torch.float32) for short, key in keys.items()}
    needed = {short: sorted({row[short] for row in rows}) for short in columns}
    cand = {}
    for short, key in keys.items():
        spec = run.specs[key]
        made = dense_candidates(run.weights[key], spec, factors.get(spec), [columns[short][i] for i in needed[short]])
        cand[short] = dict(zip(needed[short], made))
    with torch.no_grad():
        xs = routes.n[tok]
        ref = act(xs @ wts["w1"].T).mul_(xs @ wts["w3"].T) @ wts["w2"].T
        gate = {i: act(xs @ q.T) for i, q in cand["w1"].items()}
        up = {i: xs @ q.T for i, q in cand["w3"].items()}
        for r, row in enumerate(rows):
            y = (gate[row["w1"]] * up[row["w3"]]) @ cand["w2"][row["w2"]].T
            delta[r].index_add_(0, tok, y.sub_(ref).mul_(weight))
