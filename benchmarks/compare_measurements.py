"""Two measurements of one model side by side: how far their measured errors differ and whether
the solver picks the same options from each.

Made to compare the GPU and CPU paths (the same command with and without ``--device cpu``), or
two machines, or exl2conv against ExLlamaV2 (whose measurement carries no predicted KL: the
solver then uses the error objective for both)::

    python benchmarks/compare_measurements.py A/measurement.json B/measurement.json --model MODEL -b 4.0

Prints the number of entries compared, the mean and worst relative difference of their errors
(1 - accuracy), and at the given bit rate each file's choice, its predicted KL where both have
one, and the modules where the choices differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exl2conv import allocation, workdir  # noqa: E402
from exl2conv.model.config import load_config  # noqa: E402
from exl2conv.model.weights import WeightIndex  # noqa: E402

PARALLEL = ".parallel_decoder"


def load(path: Path) -> tuple[dict, dict]:
    """The measurement's entries by slot (a parallel block's two branches under the strategy keys
    ``<layer>.self_attn`` and ``<layer>.mlp``, as the predicted KL is keyed), and the predicted KL."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    slots = {}
    for key, value in doc["measurement"].items():
        if key.endswith(PARALLEL) and isinstance(value, dict):
            layer = key[: -len(PARALLEL)]
            slots[f"{layer}.self_attn"], slots[f"{layer}.mlp"] = value.get("attn"), value.get("mlp")
        else:
            slots[key] = value
    return slots, workdir.predicted_of(doc)


def compare(a: Path, b: Path, model: Path, bits: float, out=print) -> dict:
    """Compare the measurements ``a`` and ``b`` of ``model``; prints what :func:`main` prints
    through ``out`` and returns the figures (or raises ValueError where they do not match)."""
    (ma, pa), (mb, pb) = load(a), load(b)
    # entries that are not lists (the final norm's and the head's, None) hold no measurement
    keys = [k for k, v in ma.items() if isinstance(v, list) and isinstance(mb.get(k), list)]
    if not keys or set(ma) != set(mb):
        raise ValueError(f"the measurements cover different modules ({len(ma)} and {len(mb)} keys, {len(keys)} shared)")
    rel, worst = [], (0.0, "", -1)
    for k in keys:
        if len(ma[k]) != len(mb[k]):
            raise ValueError(f"{k}: {len(ma[k])} entries against {len(mb[k])}")
        for i, (ea, eb) in enumerate(zip(ma[k], mb[k])):
            if int(ea["total_bits"]) != int(eb["total_bits"]):
                raise ValueError(f"{k} entry {i}: total_bits {ea['total_bits']} against {eb['total_bits']}")
            xa, xb = 1.0 - float(ea["accuracy"]), 1.0 - float(eb["accuracy"])
            r = abs(xa - xb) / max(abs(xa), abs(xb), 1e-12)
            rel.append(r)
            if r > worst[0]:
                worst = (r, k, i)
    where = f" ({worst[1]} entry {worst[2]})" if worst[1] else ""
    median = sorted(rel)[len(rel) // 2]
    out(f"{len(rel)} measured errors in {len(keys)} modules: relative difference mean {100 * sum(rel) / len(rel):.3f} %, "
        f"median {100 * median:.3f} %, worst {100 * worst[0]:.3f} %{where}")

    cfg = load_config(model)
    numel = allocation.budget_numel(cfg, WeightIndex(model))
    budget = int(numel * bits)
    both_kl = all(k in pa and k in pb for k in keys)
    choices = []
    for m, p in ((ma, pa), (mb, pb)):
        costs = [[int(e["total_bits"]) for e in m[k]] for k in keys]
        errs = [[1.0 - float(e["accuracy"]) for e in m[k]] for k in keys]
        kls = [p[k] for k in keys] if both_kl else None
        sol, _ = allocation.choose(costs, errs, kls, budget)
        choices.append(sol)
    objective = "predicted KL" if both_kl else "error (ExLlamaV2's)"
    same = sum(x == y for x, y in zip(choices[0].choice, choices[1].choice))
    out(f"-b {bits}, objective {objective}: the same option for {same} of {len(keys)} modules; "
        f"{choices[0].total_bits / numel:.4f} and {choices[1].total_bits / numel:.4f} bpw; "
        f"loss {choices[0].loss:.6g} and {choices[1].loss:.6g}")
    for k, x, y in zip(keys, choices[0].choice, choices[1].choice):
        if x != y:
            out(f"    {k}: option {x} against {y}")
    return {"entries": len(rel), "modules": len(keys), "mean_rel": sum(rel) / len(rel), "median_rel": median,
            "worst_rel": worst[0], "same_choice": same, "loss": (choices[0].loss, choices[1].loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--model", type=Path, required=True, help="the model folder both were measured on")
    ap.add_argument("-b", "--bits", type=float, default=4.0)
    args = ap.parse_args()
    try:
        compare(args.a, args.b, args.model, args.bits)
    except ValueError as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
