"""Quantization of one module with its chosen settings (ExLlamaV2's conversion/quantize.py, quant
and its quant_attn, quant_mlp, quant_moe_mlp): Hessians from a single forward pass over the
(already quantized) states, GPTQ per linear, packing, and a check that the packed tensors decode
to exactly the weights GPTQ produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exl2conv import asymmetric, distributed, shared_rows, stop, tweak
from exl2conv.errors import Exl2Error
from exl2conv.gptq import Prepared, quantize_batches
from exl2conv.layers import ModuleRun, grad_rows, padded_bias, padded_wt, run_block
from exl2conv.measure import check_finite, module_name, reference_factors
from exl2conv.model.arch import LinearSpec
from exl2conv.pack import decode_linear, mlp_bias_to_runtime_order, pack_linear
from exl2conv.qparams import MLP_INPUT_LINEARS, QParams

# The tweak's forward and backward take this many times the pass's chunk of rows per call: fewer,
# larger calls (its autograd keeps a few intermediates per chunk, the pass's chunk sizes one).
TWEAK_CHUNK = 4


@dataclass
class LinearReport:
    name: str
    desc: str
    bpw: float
    total_bits: int
    numel: int


def quantize_linear(w: torch.Tensor, bias: torch.Tensor | None, spec: LinearSpec, prep: Prepared,
                    qparams: QParams, refine=None) -> tuple[dict[str, torch.Tensor], torch.Tensor, LinearReport]:
    """GPTQ + packing of one linear. w: ``[out, in]``; returns the packed tensors (no key prefix),
    the decoded weight ``[out, in]`` as the runtime will compute it (float16, in which its values
    are exact: the forwards widen it per product, as a weight held in its source dtype), and a
    report. refine: takes GPTQ's :class:`QuantResult` and returns it with other codes on the same
    grid (:func:`exl2conv.asymmetric.fitted`); the decode check holds it to that."""
    # the padded weight in permuted row order, handed over: GPTQ works in it (no second copy)
    res = next(quantize_batches(padded_wt(w, spec, prep.perm.to(w.device)), prep, [qparams], permuted=True))[0]
    if refine is not None:
        res = refine(res)
    tensors = pack_linear(res.codes, res.qs, res.qscale_max, res.groups, res.invperm,
                          padded_bias(bias, spec) if bias is not None else None)
    decoded = decode_linear(tensors, spec.name)  # float16 [K, N], original row order
    check_decodes(decoded, res, spec.name)
    del res
    total = qparams.total_bits(spec.in_features, spec.padded_out, spec.bias)
    numel = spec.in_features * spec.padded_out + (spec.padded_out if spec.bias else 0)
    rep = LinearReport(spec.name, qparams.desc, total / numel, total, numel)
    return tensors, decoded[:, : spec.out_features].T.contiguous(), rep


def check_decodes(decoded: torch.Tensor, res, name: str, chunk_bytes: int = 64 << 20) -> None:
    """Raises unless ``decoded`` (``[K, N]``, original row order) is exactly GPTQ's dequantized
    weight; compared a slice of rows at a time, so that no whole float32 copy is made."""
    k, n = decoded.shape
    invperm = res.invperm
    step = max(1, chunk_bytes // (4 * n))
    for r0 in range(0, k, step):
        got = decoded[r0:r0 + step].to(torch.float32)
        want = res.q[invperm[r0:r0 + step]].to(got.device)
        if not torch.equal(got, want):
            diff = (got - want).abs().max().item()
            raise Exl2Error(f"{name}: packed tensors decode to other weights than GPTQ produced "
                            f"(max diff {diff:.3g}); this is a bug in exl2conv, please report it")


def _each_linear(run: ModuleRun, entry: dict, factors, states: torch.Tensor, quantized: dict):
    """Each linear of ``run.specs`` quantized (:func:`quantize_linear`), in order: yields ``(key,
    spec, (tensors, decoded, report))``; a linear's factor is let go once the caller is done with it.
    quantized: the module's weights, each linear's decoded weight put in by the caller before the
    next is asked for (the asymmetric mode's second linear reads them: :mod:`exl2conv.asymmetric`)."""
    fit = asymmetric.enabled()
    for key, spec in run.specs.items():
        qparams = QParams.from_dict(entry[spec.short])
        if fit and asymmetric.applies(run, spec):
            prep, refine = asymmetric.prepared(run, states, quantized, key, spec)
        else:
            prep, refine = factors.get(spec), None
        yield key, spec, quantize_linear(run.weights[key], run.weights.get(f"{key}.bias"), spec, prep, qparams,
                                         refine)
        del prep, refine
        factors.done(key)


def _shared_linears(world: distributed.World, run: ModuleRun, entry: dict, factors):
    """:func:`_each_linear` with the linears divided among the ranks (:meth:`World.owners`, each
    weighed by its size): each rank quantizes its own, and every rank gets every linear's packed
    tensors and decoded weight (the next states need them all; :meth:`World.share`: tensor
    collectives), in the linears' order. A linear's GPTQ and packing do not depend on the others,
    so they are the same bits whichever rank runs them."""
    specs = run.specs
    owner = world.owners([float(spec.in_features * spec.padded_out) for spec in specs.values()])
    mine = []
    for (key, spec), r in zip(specs.items(), owner):
        if r == world.rank:
            tensors, decoded, rep = quantize_linear(run.weights[key], run.weights.get(f"{key}.bias"), spec,
                                                    factors.get(spec), QParams.from_dict(entry[spec.short]))
            mine.append([rep, tuple(tensors), decoded, *tensors.values()])
        factors.done(key)
    dev = run.device
    shares = world.share(mine, f"the quantized linears of {module_name(specs, run.cfg)}", dev)
    taken = [0] * world.size
    for (key, spec), r in zip(specs.items(), owner):
        rep, names, decoded, *packed = shares[r][taken[r]]
        taken[r] += 1
        # the packed tensors apart from the buffer they came in: saved, each is a file's tensor of its own
        tensors = {k: t if r == world.rank else t.clone() for k, t in zip(names, packed)}
        yield key, spec, (tensors, decoded, rep)


@dataclass
class Tweak:
    """A module's norm weight after norm tweaking (:mod:`exl2conv.tweak`)."""
    key: str               # in the module's weight dict
    weight: torch.Tensor   # as the forward uses it
    before: float          # relative loss on the tweak's rows
    after: float


def quantize_module(run: ModuleRun, states: torch.Tensor, entry: dict, save, err_weight: torch.Tensor | None = None,
                    on_coverage=None, target: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, float, list[LinearReport], Tweak | None]:
    """run: the module (:class:`ModuleRun`), ``run.specs`` all of its linears: ``run.kind``
    "attn", "mlp" or "parallel" (a parallel decoder block quantized as ExLlamaV2 quantizes one:
    every Hessian from one pass of the unquantized block);
    entry: the chosen measurement entry (per-linear QParams dicts, keyed
    by each linear's ``short``: an MoE block's "w1", "w3", "w2" apply to every expert);
    save(name, tensors) stores one linear's packed tensors; on_coverage: gets an MoE block's
    :class:`ExpertCoverage`. Linears are quantized in ``specs`` order (an MoE block's expert by
    expert, w1, w3, w2: ExLlamaV2's conversion/quantize.py, quant_moe_mlp), each Hessian prepared
    when first needed. Returns the module's outputs on the quantized weights ``[R, L, H]``, its
    mean relative error against the unquantized outputs (``rfn_error``), per-linear reports, and
    with ``target`` (the unquantized model's outputs of this module on the first ``S`` rows,
    ``[S, L, H]``) the module's input norm tweaked towards it (:mod:`exl2conv.tweak`; not for MoE
    blocks, whose norm feeds the router); the outputs are then computed with the tweaked norm.

    The outputs overwrite ``states`` (chunk by chunk), and the unquantized outputs are recomputed
    beside the quantized ones rather than kept: the pass holds one ``[R, L, H]`` tensor, not three.
    ``run.device``: where the module runs when ``states`` live in host memory (chunks are copied in
    and out). Its linears may be in their 2-byte source dtype (:meth:`WeightIndex.held_dtype`)."""
    kind, specs, w, cfg, chunk = run.kind, run.specs, run.weights, run.cfg, run.chunk
    dev = run.device or states.device
    run = run.replace(device=dev)
    _, factors = reference_factors(run, states, module_name(specs, cfg), lambda spec: spec.name, on_coverage,
                                   keep_output=False, release_large=True)
    quantized = dict(w)
    reports = []
    in_runtime_order: dict[str, dict] = {}  # biased gate/up, saved once down_proj's q_invperm is known
    world = distributed.active()
    if world.shared and asymmetric.enabled():
        raise Exl2Error(f"EXL2CONV_ASYMMETRIC={asymmetric.level()} quantizes in one process only; leave it unset "
                        "with several devices")
    linears = (_shared_linears(world, run, entry, factors) if world.shared
               else _each_linear(run, entry, factors, states, quantized))
    for key, spec, (tensors, decoded, rep) in linears:
        if spec.short in MLP_INPUT_LINEARS and spec.expert is None and "bias" in tensors:
            in_runtime_order[spec.name] = tensors
        else:
            save(spec.name, tensors)
        if spec.short == "down_proj" and spec.expert is None:
            for name, t in in_runtime_order.items():
                save(name, t | {"bias": mlp_bias_to_runtime_order(t["bias"], tensors["q_invperm"])})
            in_runtime_order.clear()
        quantized[key] = decoded
        reports.append(rep)
    del factors, linears
    tweaked = None
    if target is not None and not any(spec.expert is not None for spec in specs.values()):
        rows = TWEAK_CHUNK * chunk
        limit = grad_rows(cfg, states.shape[1], dev) if kind in ("attn", "parallel") else None
        rows = rows if limit is None else min(rows, limit)
        rows = -(-target.shape[0] // -(-target.shape[0] // rows))  # calls of equal size: 8 + 8, not 11 + 5
        # several ranks: rank 0 alone runs the tweak, on its rows gathered from the ranks that
        # hold them, and shares the norm (its gradient sums over those rows in one process's
        # order: divided, the bits would change; every rank would only wait for it anyway)
        first = shared_rows.first_rows(world, states, target.shape[0], module_name(specs, cfg), to_main=True)
        mine = []
        if world.is_main:
            mine = [list(tweak.tweak_norm(run.replace(weights=quantized, chunk=rows), first.to(dev), target,
                                          err_weight))]
        del first
        g, before, after = world.share(mine, f"the tweaked norm of {module_name(specs, cfg)}", dev)[0][0]
        tweaked = Tweak(tweak.norm_key(kind, cfg), g, before, after)
        quantized[tweaked.key] = g
    with stop.held():  # the outputs replace the inputs: a checkpoint of the inputs needs all or none
        y_q, errs = run_block(run.replace(weights=quantized), states, ref_weights=w, err_weight=err_weight,
                              out=states)
    # a NaN or Inf anywhere in a row's outputs makes its relative error NaN or Inf: the check
    # needs no second pass over the outputs (which may be in host memory); with several ranks, each
    # rank's rows' errors, gathered in row order (the mean is then one process's of the same values)
    errs = shared_rows.gather_errors(world, errs, module_name(specs, cfg))
    check_finite(errs, f"{module_name(specs, cfg)} output")
    return y_q, float(errs.mean()), reports, tweaked

