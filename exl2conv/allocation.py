"""How -b's bits are shared among the modules: the measurement's options per slot (a module, or a
parallel block's branch), the budget they must fit, the objective, and the choice, which
:mod:`exl2conv.solver` makes exactly.

The objective is the predicted KL from the unquantized model (:mod:`exl2conv.sensitivity`) where
the measurement carries it and it stays in the range where it predicts well; otherwise
ExLlamaV2's: the smallest worst-module error (:func:`solve_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass

from exl2conv import settings, solver
from exl2conv.errors import Exl2Error
from exl2conv.layers import Module, module_linears
from exl2conv.measure import entry_bits
from exl2conv.model import arch
from exl2conv.model.weights import WeightIndex
from exl2conv.qparams import QParams


@dataclass(frozen=True)
class Slot:
    """One choice the solver makes: a quantized module's (or a parallel block's branch's) option,
    from its measured ``entries``, stored in the strategy under ``key``."""
    mod: Module
    part: str
    entries: list

    @property
    def key(self) -> str:
        return self.mod.strategy_key(self.part)


def measurement_slots(mods: list[Module], meas: dict) -> list[Slot]:
    """The solver's slots in module order, with their measurement entries."""
    slots = []
    for mod in mods:
        if not mod.quantized:
            continue
        got = meas.get(mod.meas_key)
        for part in mod.parts:
            entries = got.get(part) if mod.kind == "parallel" and isinstance(got, dict) else got
            if not isinstance(entries, list) or not entries:
                raise Exl2Error(f"the measurement has no entries for {mod.strategy_key(part)}; it was made for "
                                "another model or is incomplete: measure this model (leave out -m)")
            slots.append(Slot(mod, part, entries))
    return slots


def check_measurement_matches(cfg, slots: list[Slot], source: str) -> None:
    """Every entry's total_bits must equal what its settings cost on this model's shapes: a
    measurement made for another model is refused here, before any work."""
    for slot in slots:
        specs = module_linears(cfg, slot.mod, slot.part)
        for e in slot.entries:
            try:
                # keyed by each linear's short name: an MoE entry's "w1" covers every expert's w1
                bits = sum(QParams.from_dict(e[sp.short]).total_bits(sp.in_features, sp.padded_out, sp.bias)
                           for sp in specs.values())
                ok = bits == int(e["total_bits"]) and 0 <= float(e["accuracy"]) <= 1
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise Exl2Error(f"{source}: the entry for {slot.key} does not fit this model's shapes (its "
                                "total_bits or settings differ); it was measured on another model: "
                                "measure this model instead (leave out -m)")


def budget_numel(cfg, weights: WeightIndex) -> int:
    """The weights -b's budget is counted over (bits x this): the decoder's linears, and for a
    model of parallel decoder blocks (Cohere) the head's as well. ExLlamaV2's optimizer sums the
    sizes of the 2L modules that follow the embedding, which in a list of L parallel blocks reach
    the final norm and the head (exllamav2/conversion/optimize.py); the same -b gives the same
    decoder bits as its convert.py."""
    numel = decoder_numel(cfg)
    if arch.spec_of(cfg).parallel and cfg.num_layers >= 2:
        head = arch.head_spec(cfg, weights)
        numel += head.in_features * head.padded_out
    return numel


def decoder_numel(cfg) -> int:
    """The weights of every quantized decoder linear (output rows padded as stored): what -b's
    bits per weight are counted over."""
    total = 0
    for i in range(cfg.num_layers):
        for spec in arch.layer_linears(cfg, i).values():
            total += spec.in_features * spec.padded_out
    return total


def check_bits_reachable(cfg, bits: float, weights: WeightIndex) -> None:
    """-b must lie within what the option tables can give this model's shapes (the cheapest and
    the dearest option of every module): known before any work, where the measurement would
    otherwise run for hours before the optimizer found it out."""
    lo = hi = 0
    for i in range(cfg.num_layers):
        for kind in ("attn", "mlp"):
            totals = entry_bits(kind, arch.layer_linears(cfg, i, kind))
            lo, hi = lo + min(totals), hi + max(totals)
    numel = budget_numel(cfg, weights)
    budget = int(numel * float(bits))
    if not lo <= budget <= hi:
        raise bits_range_error(bits, lo, hi, numel)


@dataclass
class Allocation:
    """The solver's choice: the chosen measurement entry of every slot by its strategy key, and
    what the job records of the solve (bpw, expected error, predicted KL, optimality gap)."""
    strategy: dict[str, dict]
    info: dict


def allocate(cfg, weights: WeightIndex, mods: list[Module], meas: dict, pred: dict[str, list[float]],
             bits: float, source: str, rep) -> Allocation:
    """Choose one measured option per slot within ``bits`` x :func:`budget_numel` (``meas``: the
    measurement's entries by module key, ``pred``: their predicted KL by strategy key, ``source``:
    where the measurement came from, for errors), reporting through ``rep``."""
    slots = measurement_slots(mods, meas)
    check_measurement_matches(cfg, slots, source)
    numel = budget_numel(cfg, weights)
    if numel != decoder_numel(cfg):
        rep.info(f"Bits budget: -b x {numel:,} weights (the decoder's and the head's, as ExLlamaV2 counts "
                     "them for parallel decoder blocks): the decoder gets more than -b bits per weight")
    budget = int(numel * bits)
    errs = [[1.0 - float(e["accuracy"]) for e in slot.entries] for slot in slots]
    costs = [[int(e["total_bits"]) for e in slot.entries] for slot in slots]
    kls = [pred.get(slot.key) for slot in slots]
    forced = settings.active().objective == "error"
    if forced or not all(k is not None and len(k) == len(slot.entries) for k, slot in zip(kls, slots)):
        kls = None
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    if budget > hi:
        # every module would take its largest option and the target would still not be met:
        # the user asked for something else than they would get
        raise bits_range_error(bits, lo, hi, numel)
    try:
        sol, rejected = choose(costs, errs, kls, budget)
    except Exl2Error as exc:
        lo, hi = getattr(exc, "min_total", None), getattr(exc, "max_total", None)
        if lo is None:
            raise
        raise bits_range_error(bits, lo, hi, numel) from None
    if rejected is not None:
        rep.info(f"Objective: ExLlamaV2's (the smallest worst-module error), as the smallest predicted KL, "
                     f"{rejected:.3f} nats/token, is past the range where it predicts well (> {KL_TRUST})")
        kls = None
    elif kls is None:
        why = f"{OBJECTIVE_ENV}=error" if forced else "the measurement has no predicted KL"
        rep.info(f"Objective: ExLlamaV2's (the smallest worst-module error), as {why}")
    else:
        rep.info("Objective: the smallest predicted KL from the unquantized model")
    strategy = {}
    for slot, c in zip(slots, sol.choice):
        e = strategy[slot.key] = slot.entries[c]
        slot_numel = sum(sp.in_features * sp.padded_out for sp in module_linears(cfg, slot.mod, slot.part).values())
        bpw, err = e["total_bits"] / slot_numel, 1 - e["accuracy"]
        rep.line(f"    {slot.key:40s} option {c:2d}  {bpw:.4f} bpw  err {err:.6f}")
    chosen = [1 - float(slot.entries[c]["accuracy"]) for slot, c in zip(slots, sol.choice)]
    info = {"bpw": sol.total_bits / numel, "loss": sum(chosen), "max_err": max(chosen), "gap": sol.gap}
    line = (f"Chosen: {sol.total_bits / numel:.4f} bpw of {bits} allowed; expected error: "
            f"sum {sum(chosen):.6f}, worst module {max(chosen):.6f}")
    if rejected is not None:
        info["rejected_predicted_kl"] = rejected
    if kls is not None:
        info["predicted_kl"] = sol.loss
        line += f"; predicted KL {sol.loss:.5f} nats/token"
    rep.info(f"{line} (optimality gap {sol.gap:.2g})")
    return Allocation(strategy, info)


def bits_range_error(bits: float, lo: int, hi: int, numel: int) -> Exl2Error:
    return Exl2Error(f"-b {bits}: this model can be quantized at {lo / numel:.3f} to {hi / numel:.3f} bits per "
                     "weight (decoder, overheads included); choose -b in that range")


def choose(costs: list[list[int]], errs: list[list[float]], kls: list[list[float]] | None, budget: int
           ) -> tuple[solver.Solution, float | None]:
    """The solver's choice: the smallest predicted KL (``kls``: each entry's), unless that
    smallest predicted KL exceeds :data:`KL_TRUST`, or without ``kls``: then the error objective
    (:func:`solve_budget`). Returns the solution and the rejected predicted KL (None when it was
    not rejected)."""
    if kls is None:
        return solve_budget(costs, errs, budget), None
    sol = solver.solve([list(zip(c, k)) for c, k in zip(costs, kls)], budget)
    if sol.loss > KL_TRUST:
        return solve_budget(costs, errs, budget), sol.loss
    return sol, None


def solve_budget(costs: list[list[int]], errs: list[list[float]], budget: int) -> solver.Solution:
    """One option per module within the budget, minimizing ``sum(err ** alpha)``.

    alpha is searched as ExLlamaV2 does (the alpha whose optimum has the smallest worst-module
    error wins; ties go to the smaller error sum), but each solve is exact and deterministic.
    Minimizing the plain error sum (alpha 1) starves a few modules and measured worse: on
    SmolLM2 at 4.0 bpw, KL 0.243 against 0.156 with this search (docs/quality.md)."""
    best = None
    for alpha in ALPHAS:
        sol = solver.solve([[(ci, ei ** alpha) for ci, ei in zip(c, e)] for c, e in zip(costs, errs)], budget)
        worst = max(e[i] for e, i in zip(errs, sol.choice))
        total = sum(e[i] for e, i in zip(errs, sol.choice))
        if best is None or (worst, total) < best[0]:
            best = ((worst, total), sol)
    return best[1]


ALPHAS = tuple(1.0 + 0.25 * i for i in range(11))
# Set to "error" to solve on the measured errors with ExLlamaV2's objective even when the
# measurement carries predicted KL (for comparisons).
OBJECTIVE_ENV = "EXL2CONV_OBJECTIVE"
# Above this predicted KL (nats/token) the solver drops the predicted-KL objective for the error
# objective. The prediction is a second-order expansion: it holds for small errors, and on
# SmolLM2-135M it tracked the measured KL of its own choice within 2-14 % at 3.0-6.0 bpw (predicted
# 0.69 at 3.0), but at 2.5 bpw (predicted 1.30) the error objective's choice, predicted at 1.63,
# measured 1.158 against the KL objective's 1.259 (docs/quality.md).
KL_TRUST = 1.0
