"""Measurement of one attention or MLP module: every candidate of the option table, quantized
by GPTQ and scored by the module's output error on the calibration states (reference 3.2-3.5).

Returns records; printing is the caller's business.
"""

from __future__ import annotations

import torch

from exl2conv.errors import Exl2Error
from exl2conv.gptq import Hessian, prepare, quantize_many
from exl2conv.layers import padded_wt, run_block
from exl2conv.model.arch import LinearSpec
from exl2conv.qparams import ATTN_OPTIONS, MLP_OPTIONS, distinct_columns

TABLES = {"attn": ATTN_OPTIONS, "mlp": MLP_OPTIONS}


def check_finite(states: torch.Tensor, where: str) -> None:
    """Refuse calibration states ``[R, L, H]`` holding NaN or Inf: every later module would only
    spread them, and GPTQ on them yields garbage. One pass over the states, cheap next to GPTQ."""
    if not bool(torch.isfinite(states).all()):
        raise Exl2Error(f"{where}: the calibration states hold NaN or Inf values (the model's weights "
                        "overflow float32 on the calibration data); check the model's weights, e.g. "
                        "run it in transformers, before converting")


def hessians_for(specs: dict[str, LinearSpec], device) -> dict[str, Hessian]:
    """One accumulator per distinct Hessian input of the module's linears."""
    out: dict[str, Hessian] = {}
    for spec in specs.values():
        if spec.hessian_input not in out:
            out[spec.hessian_input] = Hessian(spec.in_features, device)
    return out


def measure_module(kind: str, states: torch.Tensor, w: dict, specs: dict[str, LinearSpec], cfg, rope,
                   chunk: int, name: str = "", err_weight: torch.Tensor | None = None) -> tuple[list[dict], torch.Tensor]:
    """kind: "attn" or "mlp"; states: ``[R, L, H]`` float32 reference inputs; w: the module's
    float32 weights by name (HF orientation); specs: its linears by short name, in table column
    order; err_weight: channel weights of the output error (:func:`layers.error_weight`).
    Returns the measurement entries (one per table row, ExLlamaV2's schema) and the
    reference outputs ``[R, L, H]`` that feed the next module."""
    hess = hessians_for(specs, states.device)
    y_ref, _ = run_block(kind, states, w, cfg, rope, chunk, hessians=hess)
    check_finite(y_ref, f"{name} output" if name else f"{kind} output")
    preps = {src: prepare(h.normalized(), f"{name} ({src})") for src, h in hess.items()}
    del hess

    table = TABLES[kind]
    cols = list(specs)
    distinct, rows = distinct_columns(table)
    candidates: dict[str, list[torch.Tensor]] = {}
    bits: dict[str, list[int]] = {}
    for c, short in enumerate(cols):
        spec = specs[short]
        wt = padded_wt(w[short], spec)
        results = quantize_many(wt, preps[spec.hessian_input], distinct[c], keep_codes=False)
        # dequantized values are exact in float16: keep them so, half the memory
        candidates[short] = [r.weight[:, : spec.out_features].T.to(torch.float16) for r in results]
        bits[short] = [q.total_bits(spec.in_features, spec.padded_out, spec.bias) for q in distinct[c]]
        del results, wt

    entries = []
    current: dict[str, int] = {}
    trial = dict(w)
    for row in rows:
        for c, short in enumerate(cols):
            if current.get(short) != row[c]:
                trial[short] = candidates[short][row[c]].to(torch.float32)
                current[short] = row[c]
        _, errs = run_block(kind, states, trial, cfg, rope, chunk, ref=y_ref, keep_output=False,
                            err_weight=err_weight)
        accuracy = max(1e-6, 1.0 - float(errs.mean()))
        entry = {"accuracy": accuracy,
                 "total_bits": sum(bits[short][row[c]] for c, short in enumerate(cols))}
        for c, short in enumerate(cols):
            entry[short] = distinct[c][row[c]].to_dict()
        entries.append(entry)
    return entries, y_ref
