import json
import random
import time

import numpy as np
import pytest

from exl2conv.errors import Exl2Error
from exl2conv.solver import BudgetError, Solution, cost_range, solve, total_bits, total_loss

# SmolLM2-135M decoder linears, (K, N) each; 30 layers. The budget counts only these.
SMOL_LAYERS = 30
SMOL_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576),
               (576, 1536), (576, 1536), (1536, 576)]
SMOL_NUMEL_PER_LAYER = sum(k * n for k, n in SMOL_SHAPES)
BITS_SWEEP = [2.5 + 0.25 * i for i in range(23)]          # 2.5 .. 8.0


def exhaustive(slots, budget):
    """Reference optimum by enumerating every choice: (loss, bits, choice) or None.

    Losses are summed slot by slot in float64, the same order as `total_loss`."""
    grids = np.indices([len(o) for o in slots]).reshape(len(slots), -1).T      # [combos, S]
    loss = np.zeros(len(grids))
    bits = np.zeros(len(grids), dtype=np.int64)
    for s, opts in enumerate(slots):
        loss = loss + np.array([l for _, l in opts])[grids[:, s]]
        bits = bits + np.array([c for c, _ in opts], dtype=np.int64)[grids[:, s]]
    ok = np.flatnonzero(bits <= budget)
    if len(ok) == 0:
        return None
    keys = [grids[ok, s] for s in reversed(range(len(slots)))] + [bits[ok], loss[ok]]
    best = ok[np.lexsort(keys)[0]]
    return float(loss[best]), int(bits[best]), [int(j) for j in grids[best]]


def random_instance(rng: random.Random):
    """2-6 slots of 2-6 options; some draws force exact ties and dominated options."""
    style = rng.choice(["uniform", "ties", "coarse", "dominated"])
    slots = []
    for _ in range(rng.randint(2, 6)):
        n = rng.randint(2, 6)
        if style == "uniform":
            opts = [(rng.randint(0, 1000), rng.random()) for _ in range(n)]
        elif style == "ties":      # few distinct costs and losses: many equal totals
            opts = [(rng.choice([0, 10, 20, 30]), rng.choice([0.0, 0.1, 0.2, 0.3])) for _ in range(n)]
        elif style == "coarse":
            opts = [(rng.randint(0, 6), rng.randint(0, 4) * 0.1) for _ in range(n)]
        else:                      # a falling curve plus copies that are dearer and no better
            base = sorted((rng.randint(1, 100), rng.random()) for _ in range(n))
            opts = [(c, l) for c, l in base] + [(c + rng.randint(0, 5), l + rng.choice([0.0, 0.05]))
                                                for c, l in base[: n // 2]]
            rng.shuffle(opts)
        slots.append(opts)
    return slots


def smol_slots(fixture_dir):
    data = json.loads((fixture_dir / "exllamav2-0.3.2_measurement.json").read_text())["measurement"]
    return [[(int(e["total_bits"]), 1.0 - e["accuracy"]) for e in data[f"model.layers.{i}.{kind}"]]
            for i in range(SMOL_LAYERS) for kind in ("self_attn", "mlp")]


def synthetic_slots(slots, layers: int, seed: int = 0):
    """``layers`` layers cycling through the measured ones, each loss scaled by a seeded
    factor in [0.8, 1.25]; costs unchanged (same shapes)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(layers):
        for kind in range(2):
            src = slots[2 * (i % SMOL_LAYERS) + kind]
            scale = rng.uniform(0.8, 1.25, len(src))
            out.append([(c, l * float(f)) for (c, l), f in zip(src, scale)])
    return out


def check_consistent(slots, budget, sol: Solution):
    assert len(sol.choice) == len(slots)
    assert all(0 <= j < len(o) for j, o in zip(sol.choice, slots))
    assert sol.total_bits == total_bits(slots, sol.choice) <= budget
    assert sol.loss == total_loss(slots, sol.choice)
    assert sol.lower_bound <= sol.loss


# -- exactness on small instances -------------------------------------------------------------

def test_matches_exhaustive_search():
    rng = random.Random(1234)
    solved = infeasible = 0
    for _ in range(300):
        slots = random_instance(rng)
        lo, hi = cost_range(slots)
        budget = rng.randint(lo - 20, hi + 20)
        ref = exhaustive(slots, budget)
        if ref is None:
            assert budget < lo
            with pytest.raises(BudgetError):
                solve(slots, budget)
            infeasible += 1
            continue
        sol = solve(slots, budget)
        check_consistent(slots, budget, sol)
        assert (sol.loss, sol.total_bits, sol.choice) == ref, (slots, budget)
        assert sol.gap == 0.0 and sol.lower_bound == sol.loss
        assert solve(slots, budget) == sol                  # same input, same answer
        solved += 1
    assert solved > 200 and infeasible > 5                  # the draw covers both cases


def test_float_rounding_ties_follow_the_stated_order():
    # Prefixes [0,1] and [1,0] both cost 5; their float losses are 1 + 2**-52 and 1.0.
    tiny = 2.0 ** -52
    two = [[(0, 0.75), (5, 0.5)], [(0, 0.5), (5, 0.25 + tiny)]]
    sol = solve(two, 5)
    assert sol.choice == [1, 0] and sol.loss == 1.0
    # Adding 3.0 rounds both totals to 4.0: the tie goes to the lexicographically smaller
    # choice, which only a solver that keeps the near-tied prefix can find.
    three = two + [[(0, 3.0)]]
    assert total_loss(three, [0, 1, 0]) == total_loss(three, [1, 0, 0]) == 4.0
    sol = solve(three, 5)
    assert sol.choice == [0, 1, 0] and sol.gap == 0.0
    assert exhaustive(three, 5) == (4.0, 5, [0, 1, 0])


def test_ties_prefer_lower_cost_then_lower_index():
    slots = [[(10, 0.5), (4, 0.5), (4, 0.5), (20, 0.1)]]
    assert solve(slots, 15).choice == [1]
    assert solve(slots, 100).choice == [3]
    assert solve([[(3, 0.0), (3, 0.0)], [(1, 0.2), (1, 0.2)]], 10).choice == [0, 0]


def test_work_cap_reports_an_honest_bound():
    rng = random.Random(7)
    capped = 0
    for _ in range(60):
        slots = [[(rng.randint(0, 50), rng.random()) for _ in range(rng.randint(2, 5))]
                 for _ in range(rng.randint(5, 7))]
        lo, hi = cost_range(slots)
        budget = rng.randint(lo, hi)
        best_loss = exhaustive(slots, budget)[0]
        for max_states in (1, 2, 4):
            sol = solve(slots, budget, max_states=max_states)
            check_consistent(slots, budget, sol)
            assert sol.lower_bound <= best_loss <= sol.loss
            capped += sol.gap > 0
    assert capped > 0                                       # the cap did bite somewhere


# -- errors -----------------------------------------------------------------------------------

def test_infeasible_budget_raises_with_the_range():
    slots = [[(100, 0.5), (300, 0.1)], [(50, 0.2), (80, 0.0)]]
    assert cost_range(slots) == (150, 380)
    with pytest.raises(Exl2Error) as info:
        solve(slots, 149)
    err = info.value
    assert isinstance(err, BudgetError)
    assert (err.budget, err.min_total, err.max_total) == (149, 150, 380)
    assert "150" in str(err) and "380" in str(err) and "\n" not in str(err)
    sol = solve(slots, 150)
    assert sol.choice == [0, 0] and sol.total_bits == 150


@pytest.mark.parametrize("slots", [[[]], [[(10, -0.1)]], [[(10, float("nan"))]], [[(-1, 0.1)]]])
def test_malformed_slots_refused(slots):
    with pytest.raises(ValueError):
        solve(slots, 100)


# -- the real measurement and a large synthetic model -----------------------------------------

def test_smollm2_fixture_every_bitrate(fixture_dir):
    slots = smol_slots(fixture_dir)
    assert len(slots) == 60 and [len(s) for s in slots[:2]] == [19, 17]
    numel = SMOL_LAYERS * SMOL_NUMEL_PER_LAYER
    start = time.perf_counter()
    losses = []
    for bits in BITS_SWEEP:
        budget = int(numel * bits)
        sol = solve(slots, budget)
        check_consistent(slots, budget, sol)
        assert sol.gap == 0.0, bits
        losses.append(sol.loss)
    assert time.perf_counter() - start < 10.0
    # A larger budget can only help, and each step of 0.25 bpw must actually help here.
    assert all(b < a for a, b in zip(losses, losses[1:]))
    # At 2.5 bpw the optimum spends almost all of the budget.
    first = solve(slots, int(numel * 2.5))
    assert first.total_bits > 0.999 * numel * 2.5


def test_smollm2_two_layers_match_exhaustive_search(fixture_dir):
    slots = smol_slots(fixture_dir)[:4]                     # 19*17*19*17 = 104,329 choices
    numel = 2 * SMOL_NUMEL_PER_LAYER
    for bits in (2.6, 3.3, 4.1, 5.0, 6.5):
        sol = solve(slots, int(numel * bits))
        assert (sol.loss, sol.total_bits, sol.choice) == exhaustive(slots, int(numel * bits))


def test_synthetic_80_layers(fixture_dir):
    slots = synthetic_slots(smol_slots(fixture_dir), layers=80)
    numel = 80 * SMOL_NUMEL_PER_LAYER
    previous = None
    for bits in (2.5, 3.5, 4.25, 5.0, 6.0, 8.0):
        budget = int(numel * bits)
        sol = solve(slots, budget)
        check_consistent(slots, budget, sol)
        assert sol.gap == 0.0, bits
        assert previous is None or sol.loss < previous
        previous = sol.loss
    assert solve(slots, int(numel * 4.25)).choice == solve(slots, int(numel * 4.25)).choice


def test_choose_drops_the_predicted_kl_past_its_range():
    """allocation.choose: the smallest predicted KL while it stays under KL_TRUST; past it, the
    error objective's choice (smallest worst-module error), and the rejected value is reported."""
    from exl2conv.allocation import KL_TRUST, choose
    costs = [[1, 2], [1, 2]]
    errs = [[0.5, 0.1], [0.3, 0.2]]
    kls = [[0.3, 0.25], [0.45, 0.05]]  # KL optimum: option 0 then 1, predicted 0.35
    sol, rejected = choose(costs, errs, kls, 3)
    assert list(sol.choice) == [0, 1] and rejected is None
    scaled = [[k * 4 * KL_TRUST for k in row] for row in kls]  # same choice, predicted 1.4
    sol, rejected = choose(costs, errs, scaled, 3)
    assert list(sol.choice) == [1, 0]  # worst error 0.3 against 0.5
    assert rejected == pytest.approx(1.4 * KL_TRUST)
    sol, rejected = choose(costs, errs, None, 3)
    assert list(sol.choice) == [1, 0] and rejected is None
