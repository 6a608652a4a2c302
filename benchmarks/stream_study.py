"""Fitting a module's linears to the unquantized model's stream, on real SmolLM2-135M layers, on
the CPU (docs/quality.md, "Session 23").

    python benchmarks/stream_study.py [--modules 15.attn 15.mlp] [--rows 40] [--held 8] [--fit 32]
                                      [--spread] [--length 512] [--settings 4] [--prior gptq]
                                      [--methods gptq asym stream stream2]

Rows evenly spaced over the built-in quantization set; the last ``--held`` are held back (the
set's random-token and technical rows: session 22's convention; ``--spread``: spread over the
spaced rows instead), ``--fit`` rows spread over the others fit. Two streams run to each studied
module: the unquantized model's (``x``) and the model whose earlier modules are quantized by
``--prior`` (``x_q``, the proxy of the quantization pass's states; Hessians of each earlier module
from its own quantized inputs on all non-held rows, as the pass computes them; no norm tweak):
"gptq" (every linear GPTQ'd), "asym" (today's ``EXL2CONV_ASYMMETRIC=1``: the second linears as
``asym`` below) or "none" (``x_q = x``). The studied module's linears, at one row of
ExLlamaV2's option tables, always read ``x_q``:

* ``gptq``: GPTQ on ``X_q^T X_q`` (the pass today);
* ``asym``: the first linears as ``gptq``; o_proj / down_proj GPTQ'd on its inputs as the
  quantized first linears make them, then the descent towards the unquantized module's outputs
  on the same states (:mod:`exl2conv.asymmetric`);
* ``cd1``: ``asym`` with the first linears' codes also descended on their own Hessian (the
  control for ``stream``: the descent without the stream's target);
* ``stream``: ``asym`` with the first linears' codes descended towards ``X W``, ``X`` the
  unquantized stream's normed input (GPTQ on ``X_q^T X_q``, then ``cross = X_q^T X``);
* ``stream2``: ``stream`` with the second linear's target also from the unquantized stream (the
  unquantized module's intermediate on ``x``);
* ``asymx``: ``asym`` with the second linear's target from the unquantized stream (``stream2``
  without the first linears' descent);
* ``asymho``: ``asym`` with a held-out check for the second linear: the descent runs on three
  quarters of the fit rows and is kept (redone on all of them) only if it lowers the objective on
  the last quarter, else GPTQ's codes stay.

A method name may end in ``@D``: the second linear's descent damped by ``D`` of its mean Hessian
diagonal (default ``--damp``, GPTQ's 0.12).

Printed per module, setting, fit size and method, on the held-back rows (each channel weighted by
the weight of the norm that reads the output next): ``total`` = ``|w (M_q(x_q) - M(x))|^2 /
|w (M(x) - x)|^2``, the quantized model's state after the module against the unquantized model's,
relative to the module's contribution (the incoming error ``|w (x_q - x)|^2`` on the same scale is
printed once); ``own`` = the same with ``M(x_q)`` as the reference (the pass's module error);
``fit`` = ``total`` on the fit rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's exl2conv, not another installed one
from rounding_study import next_norm  # noqa: E402

from exl2conv import gptq, rounding  # noqa: E402
from exl2conv.calibration import builtin_rows  # noqa: E402
from exl2conv.model import WeightIndex, forward, layer_linears, load_config  # noqa: E402
from exl2conv.qparams import ATTN_OPTIONS, MLP_OPTIONS  # noqa: E402
from exl2conv.smollm2 import smollm2_fp16  # noqa: E402
from exl2conv.tokenizer import load_tokenizer  # noqa: E402

FIRST = "post_norm"
SECOND = {"attn": "attn_output", "mlp": "pre_down"}


def option_row(part: str, setting: int):
    table = ATTN_OPTIONS if part == "attn" else MLP_OPTIONS
    return table[min(setting, len(table) - 1)]


def captured(part, x, w, cfg, rope, layer, name) -> torch.Tensor:
    """The intermediate ``name`` of the module with weights ``w`` on ``x``, as ``[tokens, K]`` float64."""
    a = forward.BLOCKS[part](x, w, cfg, rope, capture=True, layer=layer)[1][name]
    return a.reshape(-1, a.shape[-1]).double()


def gram(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return (a.T @ (a if b is None else b) / a.shape[0]).float()


def fit_linear(wt, qp, h, cross=None, descend=False, damp=gptq.PERCDAMP, check=None):
    """GPTQ of ``wt`` ``[K, N]`` on ``h``; with ``descend``, its codes moved by the descent on
    ``(h, cross)`` (cross None: symmetric). check: ``((h_a, cross_a), (h_b, cross_b))`` of two
    halves of the fit rows: the descent on the first is kept (redone on all rows) only where it
    lowers the objective of the second. Returns the dequantized weight ``[K, N]`` (original order)
    and whether the descent was kept."""
    prep = gptq.prepare(h.clone())
    res = gptq.quantize(wt, prep, qp)
    if not descend:
        return res.weight, False
    perm = prep.perm
    zero, top, scale = rounding.grid_rows(res.groups, res.qs, res.qscale_max, wt.shape[0])
    w_p = wt[perm]

    def run(hh, cc):
        hp, cp = rounding.damped(hh[perm][:, perm], None if cc is None else cc[perm][:, perm], damp)
        return rounding.descend(w_p, res.codes, zero, top, scale, hp, cp)

    if check is not None:
        (ha, ca), (hb, cb) = check
        _, q_a, _, _ = run(ha, ca)
        hb_p, cb_p = hb[perm][:, perm], (hb if cb is None else cb)[perm][:, perm]
        if rounding.objective(w_p, q_a, hb_p, cb_p) >= rounding.objective(w_p, res.q, hb_p, cb_p):
            return res.weight, False
    _, q, _, _ = run(h, cross)
    return q[prep.invperm], True


def quantize_module(method, part, x_fit, xq_fit, w, cfg, rope, layer, setting, damp, second_damp):
    """The module's weight dict with its linears quantized by ``method`` (the module docstring)."""
    specs = layer_linears(cfg, layer, part)
    out = dict(w)
    a1 = captured(part, xq_fit, w, cfg, rope, layer, FIRST)
    h1 = gram(a1)
    c1 = gram(a1, captured(part, x_fit, w, cfg, rope, layer, FIRST)) if method.startswith("stream") else None
    del a1
    kept = []
    for (key, spec), qp in zip(specs.items(), option_row(part, setting)):
        wt = w[key].float().T.contiguous()
        if spec.hessian_input == FIRST:
            q, k = fit_linear(wt, qp, h1, c1, method in ("cd1", "stream", "stream2"), damp)
        elif method == "gptq":
            q, k = fit_linear(wt, qp, gram(captured(part, xq_fit, w, cfg, rope, layer, spec.hessian_input)))
        else:
            a = captured(part, xq_fit, out, cfg, rope, layer, spec.hessian_input)
            ref = x_fit if method in ("stream2", "asymx") else xq_fit
            b = captured(part, ref, w, cfg, rope, layer, spec.hessian_input)
            check = None
            if method == "asymho":
                tokens = a.shape[0] // xq_fit.shape[0]
                cut = tokens * (xq_fit.shape[0] * 3 // 4)
                check = ((gram(a[:cut]), gram(a[:cut], b[:cut])), (gram(a[cut:]), gram(a[cut:], b[cut:])))
            q, k = fit_linear(wt, qp, gram(a), gram(a, b), True, second_damp, check)
            del a, b
        kept.append(k)
        out[key] = q.T.contiguous()
    return out, kept


def weighted(d: torch.Tensor, wn: torch.Tensor) -> float:
    return float((d.double() * wn.double()).square().sum())


def streams(cfg, index, ids, pool, studied, prior, setting, rope, damp):
    """{(layer, part): (x, x_q, weights)} before each studied module: ``x`` the unquantized model's
    states, ``x_q`` those of the model with every earlier module quantized by ``prior`` (its
    Hessians from the rows ``pool``)."""
    x = forward.embed(ids, index.get("model.embed_tokens.weight").float())
    xq = x.clone()
    last = max(studied)
    out = {}
    for layer in range(last[0] + 1):
        for part in ("attn", "mlp"):
            w = forward.load_layer_weights(index, cfg, layer, part)
            if (layer, part) in studied:
                out[(layer, part)] = (x.clone(), xq.clone(), w)
            if (layer, part) == last:
                return out
            if prior == "none":
                x = xq = forward.BLOCKS[part](x, w, cfg, rope, layer=layer)[0]
                continue
            wq, _ = quantize_module("gptq" if prior == "gptq" else "asym", part, x[pool], xq[pool], w, cfg, rope,
                                    layer, setting, damp, damp)
            x = forward.BLOCKS[part](x, w, cfg, rope, layer=layer)[0]
            xq = forward.BLOCKS[part](xq, wq, cfg, rope, layer=layer)[0]
    return out


def study(cfg, index, layer, part, x, xq, w, rope, fits, held, setting, methods, damp):
    wn = next_norm(index, cfg, layer, part)
    specs = layer_linears(cfg, layer, part)
    bits = sum(qp.total_bits(s.in_features, s.padded_out) for s, qp in zip(specs.values(), option_row(part, setting)))
    bpw = bits / sum(s.in_features * s.padded_out for s in specs.values())
    x_t, xq_t = x[held], xq[held]
    y_t = forward.BLOCKS[part](x_t, w, cfg, rope, layer=layer)[0]
    own_t = forward.BLOCKS[part](xq_t, w, cfg, rope, layer=layer)[0]
    scale = weighted(y_t - x_t, wn)
    print(f"layer {layer:2d} {part:4s} setting {setting} ({bpw:.2f} bpw): incoming error on held-back rows "
          f"{weighted(xq_t - x_t, wn) / scale:.5f}", flush=True)
    for fit in fits:
        x_f, xq_f = x[fit], xq[fit]
        y_f = forward.BLOCKS[part](x_f, w, cfg, rope, layer=layer)[0]
        scale_f = weighted(y_f - x_f, wn)
        base = None
        for m in methods:
            name, _, d2 = m.partition("@")
            t0 = time.perf_counter()
            wq, kept = quantize_module(name, part, x_f, xq_f, w, cfg, rope, layer, setting, damp,
                                       float(d2) if d2 else damp)
            took = time.perf_counter() - t0
            total = weighted(forward.BLOCKS[part](xq_t, wq, cfg, rope, layer=layer)[0] - y_t, wn) / scale
            own = (weighted(forward.BLOCKS[part](xq_t, wq, cfg, rope, layer=layer)[0] - own_t, wn)
                   / weighted(own_t - xq_t, wn))
            total_f = weighted(forward.BLOCKS[part](xq_f, wq, cfg, rope, layer=layer)[0] - y_f, wn) / scale_f
            base = total if base is None else base
            mark = "" if name != "asymho" else f"  descent kept {kept}"
            print(f"layer {layer:2d} {part:4s} setting {setting} fit {len(fit):3d} {m:12s} total {total:.5f} "
                  f"({(total / base - 1) * 100:+6.1f} %)  own {own:.5f}  fit {total_f:.5f}  {took:5.1f} s{mark}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", nargs="+", default=["15.attn", "15.mlp"], help="layer.part, e.g. 15.attn")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--held", type=int, default=8)
    ap.add_argument("--fit", type=int, nargs="+", default=[32], help="fit sizes (each spread over the others)")
    ap.add_argument("--spread", action="store_true", help="held-back rows spread over the set, not its last")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--settings", type=int, nargs="+", default=[4])
    ap.add_argument("--prior", choices=("gptq", "asym", "none"), default="gptq")
    ap.add_argument("--methods", nargs="+", default=["gptq", "asym", "stream", "stream2"])
    ap.add_argument("--damp", type=float, default=gptq.PERCDAMP)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    src = smollm2_fp16()
    cfg, index = load_config(src), WeightIndex(src)
    ids = builtin_rows(load_tokenizer(src), args.length, "quant")
    ids = ids[torch.linspace(0, ids.shape[0] - 1, args.rows).round().long()]
    if args.spread:  # every source in both: the held-back rows spread over the spaced rows
        held = torch.linspace(0, args.rows - 1, args.held).round().long()
    else:
        held = torch.arange(args.rows - args.held, args.rows)
    pool = torch.tensor([r for r in range(args.rows) if r not in set(held.tolist())])
    fits = [pool[torch.linspace(0, len(pool) - 1, f).round().long()] for f in args.fit]
    studied = [(int(s.split(".")[0]), s.split(".")[1]) for s in args.modules]
    rope = forward.RotaryCache(cfg)
    with torch.no_grad():
        for setting in args.settings:
            t0 = time.perf_counter()
            got = streams(cfg, index, ids, pool, studied, args.prior, setting, rope, args.damp)
            print(f"streams to {max(studied)} with prior {args.prior} at setting {setting}: "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for (layer, part) in studied:
                x, xq, w = got[(layer, part)]
                study(cfg, index, layer, part, x, xq, w, rope, fits, held, setting, args.methods, args.damp)


if __name__ == "__main__":
    main()
