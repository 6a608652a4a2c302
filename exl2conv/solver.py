"""Bit-budget optimiser: pick one measured option per slot, exactly.

ExLlamaV2 anneals (reference section 4); this module solves the same choice exactly and
deterministically as a multiple-choice knapsack:

    minimise   total_loss(slots, choice)        (float sum in slot order, see `total_loss`)
    subject to sum(slots[s][choice[s]][0]) <= budget

Ties are broken by the lower total cost, then by the lexicographically smallest choice vector.

Method: a dynamic programme over slots in order that keeps, after each slot, only the prefix
states (cost, loss) that can still lead to an optimum:

* dominance: a prefix that costs no less and loses no less than another is dropped, with the
  tie rules above applied exactly (see `_pareto_keep`);
* feasibility: the cheapest completion must fit in the budget;
* bound: the LP relaxation of the remaining slots (per-slot convex hulls, filled greedily by
  efficiency) gives a lower bound on the best completion; a prefix whose bound exceeds a
  threshold is dropped. The threshold starts just above the LP optimum and grows until the
  programme finds a solution under it, which proves that solution optimal.

The float sum of a prefix is carried along exactly as `total_loss` computes it, and IEEE addition
is monotone, so dominance holds for the float objective itself, not an approximation of it.
If the number of states ever exceeds a cap, the worst-bounded states are dropped and the
result comes back with an honest lower bound (``gap > 0``) instead of running on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import Exl2Error

Option = tuple[int, float]          # (cost in bits, loss >= 0)

# Work cap: prefix states kept after any one slot. Instances from real measurements stay
# far below it (a few hundred to a few thousand); it exists so that nothing can hang.
MAX_STATES = 10_000

# Unit roundoff of float64; rounding-error bounds below are multiples of it.
_U = 2.0 ** -53

# Bound thresholds tried in turn, as fractions of the way from the LP optimum to the
# heuristic incumbent's loss (None: the incumbent itself).
_THRESHOLDS = (1e-3, 1e-2, 0.1, 0.4, None)


@dataclass(frozen=True)
class Solution:
    """An assignment of one option per slot.

    ``choice[s]`` indexes ``slots[s]``; ``total_bits`` is the summed cost; ``loss`` is
    `total_loss` of the choice; ``lower_bound`` is a proven lower bound on the optimal loss,
    equal to ``loss`` when the choice is proven optimal.
    """

    choice: list[int]
    total_bits: int
    loss: float
    lower_bound: float

    @property
    def gap(self) -> float:
        """How far ``loss`` may be above the optimum (0.0 when proven optimal)."""
        return self.loss - self.lower_bound


class BudgetError(Exl2Error):
    """The budget cannot be met: even the cheapest option everywhere costs more.

    Carries ``budget``, ``min_total`` and ``max_total`` (bits) so that the caller can restate
    the achievable range in its own units (bits per weight)."""

    def __init__(self, budget: int, min_total: int, max_total: int):
        super().__init__(
            f"bit budget of {budget} bits is below the smallest achievable total of {min_total} bits "
            f"(achievable range {min_total}..{max_total} bits); raise the target bitrate")
        self.budget = budget
        self.min_total = min_total
        self.max_total = max_total


# -- public helpers ---------------------------------------------------------------------------

def total_loss(slots: Sequence[Sequence[Option]], choice: Sequence[int]) -> float:
    """The objective: losses of the chosen options added one at a time in slot order,
    starting from 0.0. Written as a loop because ``sum`` of floats is compensated on newer
    Pythons, and the solver's exactness depends on this one fixed order."""
    acc = 0.0
    for opts, j in zip(slots, choice):
        acc += float(opts[j][1])
    return acc


def total_bits(slots: Sequence[Sequence[Option]], choice: Sequence[int]) -> int:
    """Summed cost of a choice, in bits."""
    return sum(int(opts[j][0]) for opts, j in zip(slots, choice))


def cost_range(slots: Sequence[Sequence[Option]]) -> tuple[int, int]:
    """(cheapest, dearest) achievable total cost in bits."""
    _check(slots)
    return (sum(min(int(c) for c, _ in opts) for opts in slots),
            sum(max(int(c) for c, _ in opts) for opts in slots))


def solve(slots: Sequence[Sequence[Option]], budget: int, *, max_states: int = MAX_STATES) -> Solution:
    """Optimal choice of one option per slot within ``budget`` bits.

    ``slots[s]`` is a list of ``(cost_bits, loss)`` options (at least one). Raises `BudgetError`
    (an `Exl2Error`) when ``budget`` is below the cheapest total. Deterministic: the same input
    gives the same choice, whatever the platform's sort or thread count.
    """
    lo, hi = cost_range(slots)
    if int(budget) < lo:
        raise BudgetError(int(budget), lo, hi)
    if hi >= 2 ** 53:
        # Bounds are computed on float64 costs, which are exact integers only below 2**53.
        raise ValueError(f"solver: a total cost of {hi} bits is too large to optimise exactly")
    budget = min(int(budget), hi)   # more than the dearest total changes nothing
    if not slots:
        return Solution([], 0, 0.0, 0.0)

    prepared = [_prepare_slot(opts) for opts in slots]
    bounds = _SuffixBounds(prepared)
    lp_opt = float(bounds.value(0, np.array([budget]))[0])
    floor = max(0.0, lp_opt - bounds.eps)
    inc = _greedy(slots, prepared, budget)
    inc_loss, inc_bits = total_loss(slots, inc), total_bits(slots, inc)

    # A threshold just above the LP optimum proves most instances in one pass with few states;
    # the incumbent's loss always yields a solution, so the loop ends.
    span = max(inc_loss - lp_opt, 0.0)
    for frac in _THRESHOLDS:
        limit = inc_loss if frac is None else lp_opt + frac * span
        choice, dropped = _dp(prepared, bounds, budget, limit, max_states)
        if dropped is None:
            if choice is None:
                continue
            loss, bits = total_loss(slots, choice), total_bits(slots, choice)
            if frac is not None and loss > limit:
                continue    # what the threshold cut might be better: widen it
            return Solution(choice, bits, loss, loss)
        # The cap dropped prefixes, so optimality is not proven, and a wider threshold would
        # only drop more: keep the better of this answer and the incumbent, and report what is
        # proven: prefixes cut by the threshold lose more than `limit`, those cut by the cap at
        # least `dropped`.
        best = (inc_loss, inc_bits, inc)
        if choice is not None:
            best = min(best, (total_loss(slots, choice), total_bits(slots, choice), choice))
        loss, bits, choice = best
        return Solution(list(choice), bits, loss, min(loss, max(floor, min(dropped, limit))))
    raise AssertionError("unreachable: without the cap, the incumbent's threshold keeps it")


# -- input checks and per-slot preparation ----------------------------------------------------

def _check(slots: Sequence[Sequence[Option]]) -> None:
    for s, opts in enumerate(slots):
        if len(opts) == 0:
            raise ValueError(f"solver: slot {s} has no options")
        for j, (c, l) in enumerate(opts):
            if int(c) != c or c < 0:
                raise ValueError(f"solver: slot {s} option {j}: cost must be a non-negative int, got {c!r}")
            if not math.isfinite(l) or l < 0:
                raise ValueError(f"solver: slot {s} option {j}: loss must be finite and >= 0, got {l!r}")


@dataclass(frozen=True)
class _Slot:
    """The options of one slot that can appear in an optimum, sorted by (cost, loss, index).

    cost: [n] int64, loss: [n] float64, index: [n] int64 (position in the caller's list).
    hull_cost/hull_loss: [h] vertices of the lower convex hull, cost ascending, loss descending.
    """

    cost: np.ndarray
    loss: np.ndarray
    index: np.ndarray
    hull_cost: np.ndarray
    hull_loss: np.ndarray


def _prepare_slot(opts: Sequence[Option]) -> _Slot:
    n = len(opts)
    cost = [int(c) for c, _ in opts]
    loss = [float(l) for _, l in opts]

    def beaten(j: int) -> bool:
        # i beats j in any context: no dearer, no lossier, and a float tie in the total is
        # then broken in i's favour (by cost, or by the lower index at equal cost).
        return any(cost[i] <= cost[j] and loss[i] <= loss[j] and (cost[i] < cost[j] or i < j)
                   for i in range(n) if i != j)

    kept = sorted((j for j in range(n) if not beaten(j)), key=lambda j: (cost[j], loss[j], j))
    c = np.array([cost[j] for j in kept], dtype=np.int64)
    l = np.array([loss[j] for j in kept], dtype=np.float64)
    hc, hl = _lower_hull(c, l)
    return _Slot(c, l, np.array(kept, dtype=np.int64), hc, hl)


def _lower_hull(cost: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the lower-left convex hull of points sorted by cost: start at the cheapest
    lowest-loss point, end at the lowest loss, slopes strictly increasing (all negative)."""
    pts: list[tuple[int, float]] = []
    for c, l in zip(cost.tolist(), loss.tolist()):
        if pts and (c == pts[-1][0] or l >= pts[-1][1]):
            continue        # same cost (sorted by loss) or not an improvement
        while len(pts) >= 2:
            (c0, l0), (c1, l1) = pts[-2], pts[-1]
            # Drop the middle point if it lies on or above the chord (c0,l0)-(c,l).
            if (l1 - l0) * (c - c0) >= (l - l0) * (c1 - c0):
                pts.pop()
            else:
                break
        pts.append((c, l))
    return (np.array([p[0] for p in pts], dtype=np.float64),
            np.array([p[1] for p in pts], dtype=np.float64))


# -- LP bound for suffixes of slots -----------------------------------------------------------

class _SuffixBounds:
    """F_k(R): the LP relaxation's minimum loss of slots k..S-1 within R bits.

    Per slot the relaxation may mix adjacent hull vertices; the optimum fills hull segments in
    order of loss saved per bit. F_k is convex, piecewise linear and non-increasing; it is
    stored as breakpoints (xs[k], ys[k]) for np.interp. ``eps`` bounds the float error of any
    bound and of any float-summed objective, so ``value - eps`` is a proven lower bound.
    """

    def __init__(self, slots: Sequence[_Slot]):
        n = len(slots)
        self.min_cost = np.zeros(n + 1, dtype=np.int64)      # cheapest cost of slots k..S-1
        self.xs: list[np.ndarray] = [None] * (n + 1)         # type: ignore[list-item]
        self.ys: list[np.ndarray] = [None] * (n + 1)         # type: ignore[list-item]
        self.xs[n], self.ys[n] = np.zeros(1), np.zeros(1)
        seg_dc = np.zeros(0)
        seg_dl = np.zeros(0)
        base_c, base_l = 0.0, 0.0
        for k in range(n - 1, -1, -1):
            sl = slots[k]
            self.min_cost[k] = self.min_cost[k + 1] + int(sl.cost[0])
            base_c += sl.hull_cost[0]
            base_l += sl.hull_loss[0]
            seg_dc = np.concatenate([seg_dc, np.diff(sl.hull_cost)])
            seg_dl = np.concatenate([seg_dl, np.diff(sl.hull_loss)])
            order = np.lexsort((seg_dc, seg_dl / seg_dc))
            seg_dc, seg_dl = seg_dc[order], seg_dl[order]
            self.xs[k] = base_c + np.concatenate([[0.0], np.cumsum(seg_dc)])
            self.ys[k] = base_l + np.concatenate([[0.0], np.cumsum(seg_dl)])
        # Every partial sum met here (prefix losses, bounds, cumulative hull losses) is at most
        # the sum of each slot's largest loss; each float addition errs by at most U times that.
        self.magnitude = 2.0 * sum(float(sl.loss.max()) for sl in slots)
        additions = 4 * (n + 2 + sum(len(sl.hull_cost) for sl in slots))
        self.eps = 4 * _U * additions * self.magnitude

    def tie_tol(self, remaining_slots: int) -> float:
        """Largest loss difference between two prefixes that the remaining additions could
        round away into an exact tie (each addition narrows it by at most 2*U*magnitude)."""
        return 4 * _U * self.magnitude * (remaining_slots + 1)

    def value(self, k: int, remaining: np.ndarray) -> np.ndarray:
        """F_k at each remaining budget (bits, any shape); callers pass remaining >= min_cost[k]."""
        return np.interp(remaining.astype(np.float64), self.xs[k], self.ys[k])


# -- incumbent --------------------------------------------------------------------------------

def _greedy(slots: Sequence[Sequence[Option]], prepared: Sequence[_Slot], budget: int) -> list[int]:
    """A good feasible choice: fill hull segments by efficiency, skipping any that do not fit
    (and that slot's later segments), then spend what is left on single-slot improvements."""
    pos = [0] * len(prepared)
    # hull vertex -> kept option with that cost (the first kept one has the lowest loss)
    def option_at(sl: _Slot, v: int) -> int:
        return int(sl.index[int(np.searchsorted(sl.cost, int(sl.hull_cost[v])))])
    choice = [option_at(sl, 0) for sl in prepared]
    spent = total_bits(slots, choice)
    segs = []
    for s, sl in enumerate(prepared):
        for v in range(1, len(sl.hull_cost)):
            dc = sl.hull_cost[v] - sl.hull_cost[v - 1]
            dl = sl.hull_loss[v] - sl.hull_loss[v - 1]
            segs.append((dl / dc, s, v))
    blocked = set()
    for _, s, v in sorted(segs):
        if s in blocked or pos[s] != v - 1:
            continue
        j = option_at(prepared[s], v)
        extra = int(slots[s][j][0]) - int(slots[s][choice[s]][0])
        if spent + extra > budget:
            blocked.add(s)
            continue
        spent += extra
        choice[s], pos[s] = j, v
    improved = True
    while improved:
        improved = False
        for s, opts in enumerate(slots):
            cur_c, cur_l = int(opts[choice[s]][0]), float(opts[choice[s]][1])
            for j, (c, l) in enumerate(opts):
                c, l = int(c), float(l)
                if spent - cur_c + c <= budget and (l, c) < (cur_l, cur_c):
                    spent += c - cur_c
                    choice[s], cur_c, cur_l = j, c, l
                    improved = True
    return choice


# -- the dynamic programme --------------------------------------------------------------------

def _dp(prepared: Sequence[_Slot], bounds: _SuffixBounds, budget: int, limit: float,
        max_states: int) -> tuple[list[int] | None, float | None]:
    """Best choice among those whose LP bound stays within ``limit``.

    Returns (choice, dropped): choice is None when no prefix survives; dropped is None when
    every prefix left behind was left by proof, else the smallest lower bound (loss) among
    the prefixes that the work cap dropped.
    """
    n = len(prepared)
    # One entry per prefix state: cost [bits], loss (float prefix sum), lexicographic rank.
    cost = np.zeros(1, dtype=np.int64)
    loss = np.zeros(1, dtype=np.float64)
    rank = np.zeros(1, dtype=np.int64)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    dropped: float | None = None
    threshold = limit + bounds.eps
    for k, sl in enumerate(prepared):
        m = len(sl.cost)
        c = (cost[:, None] + sl.cost[None, :]).ravel()
        l = (loss[:, None] + sl.loss[None, :]).ravel()
        idx = np.flatnonzero(budget - c >= bounds.min_cost[k + 1])
        bound = l[idx] + bounds.value(k + 1, budget - c[idx])
        idx, bound = idx[bound <= threshold], bound[bound <= threshold]
        if len(idx) == 0:
            return None, dropped
        parent, opt = idx // m, idx % m
        # Prefixes compare as (parent prefix, option index): rank them by that pair.
        lex = rank[parent] * (int(sl.index.max()) + 1) + sl.index[opt]
        # Sorting is the costly step, so cap the candidates before it, then the states after.
        for cap, prune in ((4 * max_states, False), (max_states, True)):
            if prune:
                keep = _pareto_keep(c[idx], l[idx], lex, bounds.tie_tol(n - k - 1))
                idx, bound, lex = idx[keep], bound[keep], lex[keep]
            if len(idx) > cap:
                keep, low = _best_by_bound(bound, lex, cap)
                dropped = low - bounds.eps if dropped is None else min(dropped, low - bounds.eps)
                idx, bound, lex = idx[keep], bound[keep], lex[keep]
        cost, loss = c[idx], l[idx]
        rank = np.empty(len(lex), dtype=np.int64)
        rank[np.argsort(lex, kind="stable")] = np.arange(len(lex), dtype=np.int64)
        parents.append(idx // m)
        options.append(idx % m)
    best = int(np.lexsort((rank, cost, loss))[0])
    choice = [0] * n
    for k in range(n - 1, -1, -1):
        choice[k] = int(prepared[k].index[options[k][best]])
        best = int(parents[k][best])
    return choice, dropped


def _best_by_bound(bound: np.ndarray, lex: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """The ``count`` entries smallest by (bound, lex), as sorted indices, and the smallest bound
    among the rest. Exact on ties, so the result never depends on the selection algorithm."""
    kth = np.partition(bound, count)[count]
    sure = np.flatnonzero(bound < kth)
    ties = np.flatnonzero(bound == kth)
    ties = ties[np.argsort(lex[ties], kind="stable")][:count - len(sure)]
    return np.sort(np.concatenate([sure, ties])), float(kth)


def _pareto_keep(cost: np.ndarray, loss: np.ndarray, lex: np.ndarray, tol: float) -> np.ndarray:
    """Indices of prefix states that no other state beats for every completion.

    A beats B when cost_A <= cost_B, loss_A <= loss_B and either cost_A < cost_B (a float tie
    after rounding is then broken by cost), or A is lexicographically smaller, or loss_B exceeds
    loss_A by more than ``tol`` (the most that rounding in the remaining additions can close).
    Within one cost the check is made against the group's best state only, which may keep a
    few extra states; that is safe. Returns sorted indices.
    """
    order = np.lexsort((lex, loss, cost))
    c, l, x = cost[order], loss[order], lex[order]
    start = np.ones(len(c), dtype=bool)
    start[1:] = c[1:] != c[:-1]
    group = np.cumsum(start) - 1
    head = np.flatnonzero(start)
    head_loss = l[head]
    # lowest loss among strictly cheaper groups
    prev_min = np.full(len(head), np.inf)
    prev_min[1:] = np.minimum.accumulate(head_loss)[:-1]
    keep = l < prev_min[group]
    h = head[group]
    near_tie = (x < x[h]) & (l - l[h] <= tol)
    keep &= start | near_tie
    return np.sort(order[keep])
