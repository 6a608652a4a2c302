"""The output head, the last module of the quantization pass: quantized with the fixed -hb layout
(ExLlamaV2's conversion/quantize.py, quant: the head's options come from qparams_headoptions),
the final norm tweaked for it, and the calibration perplexity of the quantized model, which
ExLlamaV2's convert.py prints too."""

from __future__ import annotations

import math
from typing import Any

import torch

from exl2conv import calib_rows, calibration, distributed, shared_rows, tweak
from exl2conv.gptq import Hessian, prepare
from exl2conv.job import Job
from exl2conv.memory import release_unused
from exl2conv.model import arch, forward
from exl2conv.qparams import HEAD_OPTIONS
from exl2conv.quantize import quantize_linear

PPL_TOKENS = 512  # positions per head forward of the calibration perplexity (a 7B's logits over a row: 0.25 GiB)


def quantize_head(ctx, states: torch.Tensor, save, stream: torch.Tensor | None = None) -> dict:
    """The head of ``ctx`` (the job's :class:`pipeline.Context`) with the fixed -hb layout, then
    the calibration perplexity on the first :func:`perplexity_rows` rows of the quantization set.
    ``states``: the residual stream before the final norm; ``save``: where the packed tensors go
    (:func:`pipeline.save_linear`); with ``stream`` (the unquantized model's on the first rows),
    the final norm is tweaked for the quantized head (:mod:`exl2conv.tweak`). Returns the
    module's quant_log record."""
    cfg, dev = ctx.cfg, ctx.device
    spec = arch.head_spec(cfg, ctx.weights)
    g, bias = forward.load_final_norm(ctx.weights, cfg, dev)
    world = distributed.active()
    # on a GPU in its own 2-byte dtype (a 7B head is 0.5 GiB in float32): GPTQ and the forwards
    # widen it exactly where they need float32; read by the head's GPTQ and the final norm's
    # tweak, both rank 0's alone (below)
    w = forward.load_head(ctx.weights, cfg, dev, ctx.weights.held_dtype(spec.tensor, dev.type == "cuda")) \
        if world.is_main else None
    h = Hessian(spec.in_features, dev)
    for r in range(states.shape[0]):
        h.add(forward.final_norm(states[r].to(dev), g, cfg, bias))
    shared_rows.reduce_hessians(world, {"head": h}, spec.name)  # several ranks: each added its own rows
    # several ranks: rank 0 alone runs the head's GPTQ (one linear; its scales share a per-group
    # maximum over all columns, so it cannot be split without other bits) and saves it, the others
    # get its decoded weight, which their rows' tweak and perplexity need
    mine = []
    if world.is_main:
        prep = prepare(h, spec.name)
        del h
        tensors, decoded, rep = quantize_linear(w, None, spec, prep, HEAD_OPTIONS[int(ctx.job["head_bits"])])
        save(spec.name, tensors)
        del tensors, prep
        mine = [[decoded, rep]]
    else:
        del h
    if world.shared:
        decoded, rep = world.share(mine, f"the quantized {spec.name}", dev)[0][0]
    release_unused(dev)  # GPTQ's and the packing's buffers, before the tweak's
    out: dict[str, Any] = {}
    if stream is not None:  # several ranks: rank 0's alone, as the modules' (quantize.quantize_module)
        first = shared_rows.first_rows(world, states, stream.shape[0], spec.name, to_main=True)
        mine = [list(tweak.tweak_final_norm(first.to(dev), stream, g, w, decoded, cfg, bias=bias))] \
            if world.is_main else []
        del first
        g, before, after = world.share(mine, f"the tweaked {arch.final_norm_tensor(cfg)}", dev)[0][0]
        tweak.save_norm(save, arch.final_norm_tensor(cfg), g, cfg)
        out["tweak"] = [before, after]
    del w
    head = decoded.float()  # widened once for every row below (0.5 GiB for a 7B head)
    del decoded
    release_unused(dev)
    ids = ctx.folder.load_ids("quant").to(dev)
    rows = perplexity_rows(ctx.job, ids.shape[0], calib_rows.noise_count(cfg, "measure"))
    # several ranks: each takes its own rows of the first ``rows`` and the sums are added in rank order
    mine = world.row_range(ids.shape[0])
    ids = ids[mine.start:max(mine.start, min(mine.stop, rows))]
    nll, count = log_likelihood(states[:ids.shape[0]], ids, lambda x: forward.final_norm(x.to(dev), g, cfg, bias),
                                head, cfg)
    nll, count = shared_rows.sum_values(world, [nll, float(count)], "the calibration perplexity")
    ppl = math.exp(nll / max(count, 1))
    return {**out, "ppl": ppl, "ppl_rows": rows, "ppl_length": int(ids.shape[1]),
            "linears": [[rep.name, rep.desc, rep.total_bits, rep.numel]]}


def log_likelihood(states: torch.Tensor, ids: torch.Tensor, norm, head: torch.Tensor, cfg) -> tuple[float, int]:
    """The negative log-likelihood of the next tokens of ``ids`` ``[R, L]`` under the model whose
    residual stream before the final norm is ``states`` ``[R, L, H]`` (``norm(x)``: the final norm
    on the head's device), and the tokens' count: the calibration perplexity is ``exp(nll / count)``.
    Each row is taken :data:`PPL_TOKENS` positions at a time, the log-likelihood summed in float64."""
    vocab = cfg.vocab_size
    nll = torch.zeros((), dtype=torch.float64, device=head.device)
    count = 0
    for r in range(ids.shape[0]):
        x = norm(states[r])[:-1]
        target = ids[r, 1:].clamp(0, vocab - 1)
        for t0 in range(0, x.shape[0], PPL_TOKENS):
            t1 = t0 + PPL_TOKENS
            logits = forward.logits(x[t0:t1], head, cfg)[:, :vocab]
            logp = torch.log_softmax(logits + 1e-10, dim=-1)
            nll -= logp.gather(-1, target[t0:t1].unsqueeze(-1)).sum(dtype=torch.float64)
        count += target.numel()
    return float(nll), count


def perplexity_rows(job: Job, available: int, noise: int = 0) -> int:
    """How many rows of the quantization set the calibration perplexity is taken on: the first
    -mr with a parquet dataset (as ExLlamaV2 takes it), and without one as many as the built-in
    measurement set has (what ExLlamaV2's job holds as -mr by then), whatever -mr says: it does not
    apply to the built-in set, so it must not move the figure. ``noise``: the measurement set's noise
    rows (exl2conv.noise_rows), which ExLlamaV2 counts in that -mr too; the rows taken are text still,
    the quantization set's noise rows being its last."""
    rows = job["measurement_rows"] if job["cal_dataset"] else calibration.builtin_row_count("measure") + noise
    return min(int(rows), available)
