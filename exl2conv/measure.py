"""Measurement of one attention, MLP or MoE module (or one branch of a parallel block): every
candidate of the option table, quantized by GPTQ and scored by the module's output error on the
calibration states (ExLlamaV2's conversion/measure.py: measure_quant, its measure_attn, measure_mlp
and measure_moe_mlp, and their test_quant and test_error).

Returns records; printing is the caller's business.
"""

from __future__ import annotations

from typing import Callable

import torch

from exl2conv.candidates import CandidateScorer
from exl2conv.errors import Exl2Error
from exl2conv import distributed, gptq, memory, moe_measure, shared_rows
from exl2conv.coded import Coded
from exl2conv.gptq import Hessian, Prepared, prepare
from exl2conv.layers import MOE_MODE, Module, ModuleRun, gptq_passes, module_linears, run_block
from exl2conv.model.arch import LinearSpec, layer_linears, output_name, spec_of
from exl2conv.model.forward import EXPERT_TOKENS
from exl2conv.model.weights import all_finite
from exl2conv.moe import ExpertCoverage
from exl2conv.qparams import (ATTN_LINEARS, ATTN_OPTIONS, MLP_LINEARS, MLP_OPTIONS, MOE_LINEARS,
                              distinct_columns)
from exl2conv.sensitivity import predicted_kl

TABLES = {"attn": ATTN_OPTIONS, "mlp": MLP_OPTIONS}
# Entry keys of each table's columns; an MoE block uses the MLP table under its own names.
COLUMNS = {"attn": ATTN_LINEARS, "mlp": MLP_LINEARS, "moe": MOE_LINEARS}


def check_finite(states: torch.Tensor, where: str) -> None:
    """Refuse calibration states ``[R, L, H]`` holding NaN or Inf: every later module would only
    spread them, and GPTQ on them yields garbage. One pass over the states (in slices:
    :func:`all_finite`), cheap next to GPTQ."""
    if not all_finite(states):
        raise nonfinite_error(where)


def nonfinite_error(where: str) -> Exl2Error:
    return Exl2Error(f"{where}: the calibration states hold NaN or Inf values (the model's weights "
                     "overflow float32 on the calibration data); check the model's weights, e.g. "
                     "run it in transformers, before converting")


def hessians_for(specs: dict[str, LinearSpec], device) -> dict[str, Hessian]:
    """One accumulator per distinct Hessian input of the module's linears."""
    out: dict[str, Hessian] = {}
    for spec in specs.values():
        if spec.hessian_input not in out:
            out[spec.hessian_input] = Hessian(spec.in_features, device)
    return out


def is_moe(specs: dict[str, LinearSpec]) -> bool:
    return any(spec.expert is not None for spec in specs.values())


def module_name(specs: dict[str, LinearSpec], cfg=None) -> str:
    """The module's name from its linears': "model.layers.3.self_attn", "model.layers.3.mlp",
    "model.layers.3.block_sparse_moe". With the model's ``cfg``, its name in the output: an MoE
    block as ExLlamaV2 keys it whatever the checkpoint calls it (Qwen3-MoE's experts are under
    "mlp", DBRX's under "ffn"), and a keymap applied."""
    name = next(iter(specs.values())).name
    if cfg is None:
        return name.rsplit(".experts.", 1)[0] if is_moe(specs) else name.rsplit(".", 1)[0]
    base = f"{spec_of(cfg).prefix}{spec_of(cfg).layers}."
    if is_moe(specs) and name.startswith(base):
        return f"{output_name(cfg, base + name[len(base):].split('.')[0])}.{MOE_MODE}"
    return output_name(cfg, name.rsplit(".", 1)[0])


def column_keys(kind: str, specs: dict[str, LinearSpec]) -> tuple[str, ...]:
    """The entry key of each column of ``kind``'s option table, for these linears."""
    return COLUMNS["moe" if is_moe(specs) else kind]


def reference_pass(run: ModuleRun, states: torch.Tensor, name: str, on_coverage=None, keep_output: bool = True
                   ) -> tuple[torch.Tensor | None, dict[str, Hessian]]:
    """The unquantized outputs ``[R, L, H]`` (None without ``keep_output``) and the filled Hessians
    of ``run.specs``, from one pass over ``states`` (ExLlamaV2's conversion/measure.py,
    measure_quant, its reference forward pass). For an MoE block, the experts' calibration
    coverage is counted too and handed to ``on_coverage`` (an :class:`ExpertCoverage`) when given.
    Where the module runs on ``run.device`` and ``states`` live in host memory, the Hessians are
    accumulated on the device; all but the first linear's then move to pinned host memory until
    the caller moves each back for its turn."""
    specs, device = run.specs, run.device
    hess = hessians_for(specs, device or states.device)
    accumulators: dict = dict(hess)
    cov = None
    if is_moe(specs):
        cov = ExpertCoverage(name or module_name(specs, run.cfg), run.cfg.num_experts, states.shape[1])
        accumulators[EXPERT_TOKENS] = cov
    finite: list = []
    y_ref, _ = run_block(run, states, hessians=accumulators, keep_output=keep_output,
                         finite=finite if keep_output else None)
    if y_ref is not None and not bool(torch.stack(finite).all()):  # checked chunk by chunk on the device
        raise nonfinite_error(f"{name} output" if name else f"{run.kind} output")
    # several ranks: each ran its own rows, and the sums over rows are summed over the ranks
    world = distributed.active()
    shared_rows.reduce_hessians(world, hess, name or run.kind)
    if cov is not None:
        shared_rows.reduce_coverage(world, cov, name or run.kind)
    if cov is not None and on_coverage is not None:
        on_coverage(cov)
    if device is not None and device != states.device:  # all but the first wait in host memory for their turn
        first = next(iter(specs.values())).hessian_input
        for src, h in hess.items():
            if src != first:
                h.to("cpu")
    return y_ref, hess


class Factors:
    """The prepared Hessians (:func:`gptq.prepare`) of a module's linears, made from the reference
    pass's accumulators ``hess`` on ``device``: each prepared when first needed (or all at once,
    :meth:`prepare_all`), the accumulator handed over (and so freed) as it is, and let go after the
    last linear that reads it (:meth:`done`; a down_proj's factor is 0.45 GiB on Llama-2-7B, and
    an MoE block holds one per expert). label: names a linear's Hessian in error messages.
    release_large: the cache is released before each large factor (:func:`memory.large_factor`),
    whose [K, K] matrices would otherwise sit beside the cache's blocks of other sizes."""

    def __init__(self, specs: dict[str, LinearSpec], hess: dict[str, Hessian], device: torch.device,
                 label: Callable[[LinearSpec], str], release_large: bool = False):
        self.specs, self.hess, self.device, self.label = specs, hess, device, label
        self.release_large = release_large
        self.preps: dict[str, Prepared] = {}
        self.last_user = {spec.hessian_input: key for key, spec in specs.items()}

    def get(self, spec: LinearSpec) -> Prepared:
        """The prepared Hessian of linear ``spec``'s input."""
        src = spec.hessian_input
        if src not in self.preps:
            if self.release_large and memory.large_factor(spec.in_features):
                memory.release_unused(self.device)
            self.preps[src] = prepare(self.hess.pop(src).to(self.device), self.label(spec))
        return self.preps[src]

    def prepare_all(self, keys=None) -> None:
        """Every factor now (or those of the linears ``keys``), in the linears' order."""
        for key, spec in self.specs.items():
            if keys is None or key in keys:
                self.get(spec)

    def done(self, key: str) -> None:
        """Linear ``key`` has used its factor: it goes if no later linear reads it (with its
        accumulator, where it was never prepared: an expert that no calibration token reached)."""
        src = self.specs[key].hessian_input
        if self.last_user[src] == key:
            self.preps.pop(src, None)
            self.hess.pop(src, None)


def reference_factors(run: ModuleRun, states: torch.Tensor, name: str, label: Callable[[LinearSpec], str],
                      on_coverage=None, keep_output: bool = True, release_large: bool = False
                      ) -> tuple[torch.Tensor | None, Factors]:
    """:func:`reference_pass`, its Hessians handed to a :class:`Factors` on the device the module
    runs on (nothing prepared yet)."""
    y_ref, hess = reference_pass(run, states, name, on_coverage, keep_output)
    return y_ref, Factors(run.specs, hess, run.device or states.device, label, release_large)


def pass_numel(specs: dict[str, LinearSpec], counts: dict[str, int]) -> int:
    """float32 elements of the largest GPTQ pass of a module's linears (``counts``: candidates
    per linear): the measurement's one pass buffer for them all, so that passes of one size after
    another, and the [K, K] factors made between them, never take each other's place in the cache."""
    return max(gptq.batch_size(spec.in_features, spec.padded_out, counts[key], False, gptq.GPTQ_BYTES)
               * spec.in_features * spec.padded_out for key, spec in specs.items())


def codes_sizes(kind: str, specs: dict[str, LinearSpec]) -> list[int]:
    """Bytes of each candidate's codes (:class:`Coded`, uint8 ``[in, padded out]``) that
    :func:`measure_module` makes for this module, in the order it makes them; none for an MoE
    block (its candidates are kept whole in host memory instead)."""
    if is_moe(specs):
        return []
    cols = column_keys(kind, specs)
    distinct, _ = distinct_columns(TABLES[kind])
    return [spec.in_features * spec.padded_out for spec in specs.values()
            for _ in distinct[cols.index(spec.short)]]


def codes_arena(cfg, device: torch.device, mods: list[Module]) -> memory.HostArena | None:
    """One page-locked buffer for the candidates' codes of the measurement's largest module
    (:class:`memory.HostArena`), when they go to host memory (the states do: a large model)."""
    sizes = [memory.HostArena.size_for(codes_sizes(part, module_linears(cfg, m, part)))
             for m in mods if m.quantized for part in m.parts]
    if device.type != "cuda" or not sizes or max(sizes) == 0:
        return None
    return memory.HostArena(max(sizes))


def quantized_candidates(w: torch.Tensor, spec: LinearSpec, prep: Prepared, qparams: list,
                         host_codes: bool = False, buffer: torch.Tensor | None = None,
                         arena: memory.HostArena | None = None) -> list:
    """Every setting of ``qparams`` applied to one linear (``w``: its ``[out, in]`` weight) by GPTQ,
    a pass of :data:`gptq.GPTQ_BYTES` at a time: as :class:`Coded` weights on the device (a
    quarter of float32; with ``host_codes`` their codes in pinned host memory, in ``arena`` when
    given). An MoE block's experts go through :func:`moe_measure.dense_candidates` instead."""
    out = []
    invperm = torch.argsort(prep.perm.to(w.device))
    for batch in gptq_passes(w, spec, prep, qparams, buffer):
        for res in batch:
            coded = Coded.of(res, spec.out_features, invperm)
            out.append(coded.to_host(arena) if host_codes else coded)
        del batch, res  # frees the pass before the next one starts
    return out


def entry_bits(kind: str, specs: dict[str, LinearSpec]) -> list[int]:
    """The total_bits of each row of the module's option table on these linears: what its
    measurement entries will cost, known from the shapes alone (so a -b no choice can meet is
    refused before any work)."""
    cols = column_keys(kind, specs)
    distinct, rows = distinct_columns(TABLES[kind])
    column = {key: cols.index(spec.short) for key, spec in specs.items()}
    bits = {key: [q.total_bits(spec.in_features, spec.padded_out, spec.bias) for q in distinct[column[key]]]
            for key, spec in specs.items()}
    return [sum(bits[key][row[column[key]]] for key in specs) for row in rows]


def measure_module(run: ModuleRun, states: torch.Tensor, part: str | None = None, name: str = "",
                   err_weight: torch.Tensor | None = None, on_coverage=None, fisher: torch.Tensor | None = None,
                   arena: memory.HostArena | None = None) -> tuple[list[dict], torch.Tensor, list[float] | None]:
    """run: the module (:class:`ModuleRun`; its weights in HF orientation), ``run.specs`` the
    linears measured; part: the option table, "attn" or "mlp", when it is not ``run.kind`` itself:
    a parallel decoder block (Cohere, kind "parallel") is measured one branch at a time, ``specs``
    that branch's linears, the other branch left unquantized; states: ``[R, L, H]`` float32
    reference inputs; err_weight: channel weights of the output error (:func:`metrics.error_weight`);
    on_coverage: gets an MoE block's :class:`ExpertCoverage` (for the caller to report);
    fisher: ``[H]`` Fisher diagonal of the module's output (:mod:`exl2conv.sensitivity`);
    ``run.device``: where the module runs when ``states`` live in (pinned) host memory: the
    reference outputs go there too, and the candidates' codes (into ``arena`` when given: it is
    reset here, so nothing handed out from it before this call may still be in use; see
    :func:`codes_sizes`).
    Returns the measurement entries (one per table row, ExLlamaV2's schema), the reference
    outputs ``[R, L, H]`` that feed the next module, and with ``fisher`` each entry's predicted
    KL (nats per token; else None).

    An MoE block (Mixtral) is measured on the MLP table: a row applies its column choice to
    every expert, and its total_bits sums over all experts (ExLlamaV2's conversion/measure.py,
    measure_moe_mlp)."""
    kind, specs = part or run.kind, run.specs
    dev = run.device or states.device
    host_codes = dev != states.device
    if host_codes and arena is not None:
        arena.reset()  # the last module's codes
    cols = column_keys(kind, specs)
    distinct, rows = distinct_columns(TABLES[kind])
    column = {key: cols.index(spec.short) for key, spec in specs.items()}
    numel = pass_numel(specs, {key: len(distinct[column[key]]) for key in specs})
    # a module whose passes are large unmaps the cache between its phases (memory.release_unused)
    large = dev.type == "cuda" and numel * 4 >= memory.RELEASE_BYTES
    if large:
        memory.release_unused(dev)  # the last module's scoring buffers, before the reference pass's
    run = run.replace(device=dev)
    y_ref, factors = reference_factors(run, states, name, lambda spec: f"{name} ({spec.hessian_input})",
                                       on_coverage)
    if large:
        memory.release_unused(dev)  # the reference pass's buffers, before the GPTQ passes map their own
    if fisher is not None:
        fisher = fisher.to(dev, torch.float32)
    if is_moe(specs):  # expert by expert, nothing kept (moe_measure)
        all_errs = moe_measure.table_errors(run, states, y_ref, factors, dict(zip(cols, distinct)),
                                            [dict(zip(cols, row)) for row in rows], err_weight, fisher)
    else:
        all_errs = _scored_table(run, states, y_ref, factors, {key: distinct[column[key]] for key in specs},
                                 [{key: row[column[key]] for key in specs} for row in rows], numel, large,
                                 host_codes, arena, err_weight, fisher)
    del factors
    entries, predicted = [], []
    tokens = all_errs.shape[1] * states.shape[1]  # the whole set's rows (several ranks: not this rank's)
    for row, errs, total_bits in zip(rows, all_errs, entry_bits(kind, specs)):
        if fisher is not None:
            predicted.append(predicted_kl(errs[:, 1], tokens))
            errs = errs[:, 0]
        accuracy = max(1e-6, 1.0 - float(errs.mean()))
        entry = {"accuracy": accuracy, "total_bits": total_bits}
        for key, spec in specs.items():  # an ungated MLP's entries have no gate_proj (Starcoder2)
            entry.setdefault(spec.short, distinct[column[key]][row[column[key]]].to_dict())
        entries.append(entry)
    return entries, y_ref, (predicted if fisher is not None else None)


def _scored_table(run: ModuleRun, states: torch.Tensor, y_ref: torch.Tensor, factors: Factors,
                  settings: dict[str, list], choices: list[dict[str, int]], numel: int, large: bool,
                  host_codes: bool, arena: memory.HostArena | None, err_weight: torch.Tensor | None,
                  fisher: torch.Tensor | None) -> torch.Tensor:
    """A dense module's table: every candidate made (:func:`_candidates`), then every row scored
    (:func:`_table_errors`)."""
    world = distributed.active()
    if world.shared:  # the candidates divided among the ranks, then gathered
        candidates = _shared_candidates(world, run, factors, settings, numel, large, host_codes, arena)
    else:
        candidates = _candidates(run, factors, settings, numel, large, host_codes, arena)
    if large:
        memory.release_unused(run.device)  # the GPTQ passes' buffers, before the scoring's
    # several ranks: every row of the table on this rank's calibration rows, the errors gathered
    return shared_rows.gather_errors(world, _table_errors(run, states, y_ref, candidates, choices, err_weight, fisher),
                                     module_name(run.specs), dim=1)


def _pass_buffer(dev: torch.device, factors: Factors, numel: int, large: bool, keys=None) -> torch.Tensor | None:
    """On a GPU, every factor first (those of the linears ``keys``, where given: a rank's), then
    one pass buffer of ``numel`` floats for all the linears' GPTQ passes: no [K, K] temporaries
    made between passes, nothing taking the place of a freed pass. None on the CPU (each pass
    allocates its own)."""
    if dev.type != "cuda":
        return None
    factors.prepare_all(keys)
    if large:
        memory.release_unused(dev)
    return torch.empty(numel, dtype=torch.float32, device=dev)


def _candidates(run: ModuleRun, factors: Factors, settings: dict[str, list], numel: int, large: bool,
                host_codes: bool, arena: memory.HostArena | None) -> dict[str, list]:
    """:func:`measure_module`'s GPTQ phase: every linear of ``run.specs`` quantized with each of
    its ``settings`` (:func:`quantized_candidates`), on ``run.device``; ``numel``: the size of the
    largest pass (:func:`pass_numel`), ``large``: whether it is worth releasing the cache for."""
    buffer = _pass_buffer(run.device, factors, numel, large)
    candidates: dict[str, list] = {}
    for key, spec in run.specs.items():
        candidates[key] = quantized_candidates(run.weights[key], spec, factors.get(spec), settings[key], host_codes,
                                               buffer, arena)
        factors.done(key)
    return candidates


def _table_errors(run: ModuleRun, states: torch.Tensor, y_ref: torch.Tensor, candidates: dict[str, list],
                  choices: list[dict[str, int]], err_weight: torch.Tensor | None,
                  fisher: torch.Tensor | None) -> torch.Tensor:
    """The errors (:meth:`CandidateScorer.errors_table`, on the CPU) of each row of a module's
    option table, ``choices`` giving each linear's candidate index per row."""
    w = run.weights
    # the scorer holds one chunk's recording at a time
    others = frozenset(layer_linears(run.cfg, run.layer)) - run.specs.keys() if run.kind == "parallel" else frozenset()
    scorer = CandidateScorer(run, states, y_ref, err_weight, fisher=fisher, table=True, frozen=others)
    all_errs = scorer.errors_table([{**w, **{key: candidates[key][i] for key, i in row.items()}} for row in choices])
    # one copy to the host for the whole table: no sync per candidate
    return all_errs.cpu()


# -- the same work divided among several ranks (docs/distributed.md) -----------------------------------


def _shared_candidates(world: distributed.World, run: ModuleRun, factors: Factors, settings: dict[str, list],
                       numel: int, large: bool, host_codes: bool,
                       arena: memory.HostArena | None) -> dict[str, list]:
    """:func:`_candidates` with the candidates divided among the ranks: the module's (linear,
    setting) pairs, in the linears' and the settings' order, go to ranks by :meth:`World.owners`
    (each weighed by its linear's size), each rank makes its own, and all are gathered so that
    every rank holds every candidate (:meth:`World.share`: tensor collectives). A candidate's arithmetic does not depend on the others made
    in its GPTQ pass (:func:`gptq.quantize_batches`), so it is the same bits whichever rank makes it."""
    dev = run.device
    items = [(key, i) for key in run.specs for i in range(len(settings[key]))]
    owner = world.owners([float(run.specs[key].in_features * run.specs[key].padded_out) for key, _ in items])
    # a rank prepares only the factors of the linears it makes candidates of: scoring needs the
    # candidates, not the factors (the owners spread each linear's settings over the ranks, so
    # this spares a factor only where a rank's share misses a linear: docs/distributed.md)
    buffer = _pass_buffer(dev, factors, numel, large, {key for (key, _), r in zip(items, owner) if r == world.rank})
    mine: list = []
    for key, spec in run.specs.items():
        chosen = [settings[key][i] for (k, i), r in zip(items, owner) if k == key and r == world.rank]
        if chosen:
            mine += quantized_candidates(run.weights[key], spec, factors.get(spec), chosen, host_codes, buffer, arena)
        factors.done(key)
    del buffer
    # through host memory where the codes live there (a GPU then holds a slice of a rank's at a time)
    shares = world.share([c.payload() for c in mine], f"the candidates of {module_name(run.specs)}",
                         torch.device("cpu") if host_codes else dev)
    taken = [0] * world.size
    candidates: dict[str, list] = {key: [] for key in run.specs}
    for (key, _), r in zip(items, owner):
        got = mine[taken[r]] if r == world.rank else Coded.from_payload(shares[r][taken[r]], dev, host_codes, arena)
        taken[r] += 1
        candidates[key].append(got)
    return candidates

