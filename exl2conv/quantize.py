"""Quantization of one module with its chosen settings (reference 5.7): Hessians from a single
forward pass over the (already quantized) states, GPTQ per linear, packing, and a check that the
packed tensors decode to exactly the weights GPTQ produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exl2conv.errors import Exl2Error
from exl2conv.gptq import Hessian, Prepared, prepare, quantize
from exl2conv.layers import padded_bias, padded_wt, run_block
from exl2conv.measure import check_finite, hessians_for
from exl2conv.model.arch import LinearSpec
from exl2conv.pack import decode_linear, pack_linear
from exl2conv.qparams import QParams


@dataclass
class LinearReport:
    name: str
    desc: str
    bpw: float
    total_bits: int
    numel: int


def quantize_linear(w: torch.Tensor, bias: torch.Tensor | None, spec: LinearSpec, prep: Prepared,
                    qparams: QParams) -> tuple[dict[str, torch.Tensor], torch.Tensor, LinearReport]:
    """GPTQ + packing of one linear. w: ``[out, in]``; returns the packed tensors (no key prefix),
    the decoded weight ``[out, in]`` float32 as the runtime will compute it, and a report."""
    wt = padded_wt(w, spec)
    res = quantize(wt, prep, qparams)
    tensors = pack_linear(res.codes, res.qs, res.qscale_max, res.groups, res.invperm,
                          padded_bias(bias, spec) if bias is not None else None)
    decoded = decode_linear(tensors, spec.name).to(torch.float32)
    if not torch.equal(decoded, res.weight.to(decoded.device)):
        diff = (decoded - res.weight.to(decoded.device)).abs().max().item()
        raise Exl2Error(f"{spec.name}: packed tensors decode to other weights than GPTQ produced "
                        f"(max diff {diff:.3g}); this is a bug in exl2conv, please report it")
    total = qparams.total_bits(spec.in_features, spec.padded_out, spec.bias)
    numel = spec.in_features * spec.padded_out + (spec.padded_out if spec.bias else 0)
    rep = LinearReport(spec.name, qparams.desc, total / numel, total, numel)
    return tensors, decoded[:, : spec.out_features].T.contiguous(), rep


def quantize_module(kind: str, states: torch.Tensor, w: dict, specs: dict[str, LinearSpec], entry: dict,
                    cfg, rope, chunk: int, save, err_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, float, list[LinearReport]]:
    """kind: "attn" or "mlp"; entry: the chosen measurement entry (per-linear QParams dicts);
    save(name, tensors) stores one linear's packed tensors. Returns the module's outputs on the
    quantized weights ``[R, L, H]``, its mean relative error against the unquantized outputs
    (``rfn_error``), and per-linear reports."""
    hess = hessians_for(specs, states.device)
    y_ref, _ = run_block(kind, states, w, cfg, rope, chunk, hessians=hess)
    check_finite(y_ref, f"{next(iter(specs.values())).name.rsplit('.', 1)[0]} output")
    preps: dict[str, Prepared] = {}
    quantized = dict(w)
    reports = []
    for short, spec in specs.items():
        src = spec.hessian_input
        if src not in preps:
            preps[src] = prepare(hess.pop(src).normalized(), spec.name)
        qparams = QParams.from_dict(entry[short])
        bias = w.get(f"{short}.bias")
        tensors, decoded, rep = quantize_linear(w[short], bias, spec, preps[src], qparams)
        save(spec.name, tensors)
        quantized[short] = decoded
        reports.append(rep)
    y_q, errs = run_block(kind, states, quantized, cfg, rope, chunk, ref=y_ref, err_weight=err_weight)
    return y_q, float(errs.mean()), reports


def head_hessian(states: torch.Tensor, k: int) -> Hessian:
    h = Hessian(k, states.device)
    for r in range(states.shape[0]):
        h.add(states[r])
    return h
