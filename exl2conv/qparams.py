"""Quantization settings (QParams) and the option tables, as data.

A QParams describes how one linear's input features (rows of ``Wt = W^T``, shape ``[K, N]``)
are split into groups of mixed bit widths. The tables below are the search space that the
measurement pass explores; they must equal ExLlamaV2 0.3.2's, because measurement.json files
are exchanged between the two tools and a job's strategy names entries by their settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

SCALE_BITS = 4
VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Group:
    """One run of rows in permuted order: ``rows`` rows quantized at ``bits`` bits."""

    bits: int
    rows: int


@dataclass(frozen=True)
class QParams:
    """Per-bit-width group sizes and proportions. ``bits`` are listed in descending order and
    ``bits_prop`` sums to exactly 1.0 (ExLlamaV2 asserts both)."""

    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    group_size: tuple[int, ...]
    scale_bits: int = SCALE_BITS

    def __post_init__(self):
        if not (len(self.bits) == len(self.bits_prop) == len(self.group_size)) or not self.bits:
            raise ValueError(f"QParams: bits, bits_prop and group_size must have one entry each: {self}")
        if any(b not in VALID_BITS for b in self.bits):
            raise ValueError(f"QParams: bit widths must be among {VALID_BITS}: {self.bits}")
        if list(self.bits) != sorted(self.bits, reverse=True) or len(set(self.bits)) != len(self.bits):
            raise ValueError(f"QParams: bit widths must be distinct and descending: {self.bits}")
        if any(g % 32 or g <= 0 for g in self.group_size):
            raise ValueError(f"QParams: group sizes must be positive multiples of 32: {self.group_size}")
        if sum(self.bits_prop) != 1.0:
            raise ValueError(f"QParams: proportions must sum to exactly 1.0: {self.bits_prop}")
        if self.scale_bits != SCALE_BITS:
            raise ValueError(f"QParams: only {SCALE_BITS}-bit scales exist in EXL2, got {self.scale_bits}")

    # -- text and dict forms ------------------------------------------------------------------

    @property
    def desc(self) -> str:
        """ExLlamaV2's description string, e.g. ``0.05:3b_64g/0.95:2b_64g s4``."""
        parts = [f"{p}:{b}b_{g}g" for b, p, g in zip(self.bits, self.bits_prop, self.group_size)]
        return "/".join(parts) + f" s{self.scale_bits}"

    def to_dict(self) -> dict:
        """The measurement.json / job.json form (bit-width keys become strings in JSON)."""
        return {
            "group_size": {str(b): g for b, g in zip(self.bits, self.group_size)},
            "bits": list(self.bits),
            "bits_prop": list(self.bits_prop),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QParams":
        bits = tuple(int(b) for b in d["bits"])
        gs = d["group_size"]
        if isinstance(gs, dict):
            gs = {int(k): int(v) for k, v in gs.items()}
            group_size = tuple(gs[b] for b in bits)
        elif isinstance(gs, (list, tuple)):
            group_size = tuple(int(g) for g in gs)
        else:
            group_size = (int(gs),) * len(bits)
        return cls(bits, tuple(d["bits_prop"]), group_size, int(d.get("scale_bits", SCALE_BITS)))

    # -- layout and cost ----------------------------------------------------------------------

    def group_counts(self, k: int) -> list[int]:
        """Number of groups per bit width for ``k`` rows, by ExLlamaV2's greedy rule."""
        remaining = k
        counts = []
        for p, g in zip(self.bits_prop, self.group_size):
            n = math.ceil(min(k * p, remaining) / g)
            counts.append(n)
            remaining -= n * g
        if remaining > 0:
            raise ValueError(f"QParams {self.desc} does not cover {k} rows")
        return counts

    def groups(self, k: int) -> list[Group]:
        """The groups in permuted row order; only the very last one may be short."""
        out = []
        covered = 0
        for b, g, n in zip(self.bits, self.group_size, self.group_counts(k)):
            for _ in range(n):
                rows = min(g, k - covered)
                if rows <= 0:
                    break
                out.append(Group(b, rows))
                covered += rows
        return out

    def total_bits(self, k: int, n: int, bias: bool = False) -> int:
        """Storage cost in bits of one linear with ``k`` input features and padded width ``n``
        (a multiple of 32), overheads included: what measurement.json calls ``total_bits``."""
        counts = self.group_counts(k)
        g_total = sum(counts)
        weight_bits = 0
        uncovered = k
        for b, g, cnt in zip(self.bits, self.group_size, counts):
            rows = min(cnt * g, uncovered)
            weight_bits += rows * n * b
            uncovered -= rows
        bits = weight_bits + g_total * 16 + g_total * 32 + g_total * n * 4 + k * 32
        if bias:
            bits += 16 * n
        return bits

    def bpw(self, k: int, n: int, bias: bool = False) -> float:
        numel = k * n + (n if bias else 0)
        return self.total_bits(k, n, bias) / numel


def qp(*parts: tuple[int, int, float]) -> QParams:
    """Build a QParams from ``(bits, group_size, proportion)`` triples, high bits first."""
    return QParams(
        bits=tuple(p[0] for p in parts),
        bits_prop=tuple(p[2] for p in parts),
        group_size=tuple(p[1] for p in parts),
    )


# -- the option tables (reference section 3.3) ---------------------------------------------------
# Each row assigns one QParams per linear. Proportions are written exactly as ExLlamaV2 writes them
# (1 as an int), because they appear verbatim in description strings and measurement.json.

_A = {  # shorthands for the attention table
    "3/2 .05": qp((3, 64, 0.05), (2, 64, 0.95)),
    "3/2 .1": qp((3, 64, 0.1), (2, 64, 0.9)),
    "3/2 .25": qp((3, 64, 0.25), (2, 64, 0.75)),
    "4/3 g128": qp((4, 128, 0.1), (3, 128, 0.9)),
    "4/3 g64": qp((4, 64, 0.1), (3, 64, 0.9)),
    "4 g128": qp((4, 128, 1)),
    "4 g64": qp((4, 64, 1)),
    "4 g32": qp((4, 32, 1)),
    "5/4 g128": qp((5, 128, 0.1), (4, 128, 0.9)),
    "5/4 g64": qp((5, 64, 0.1), (4, 64, 0.9)),
    "5/4 g32": qp((5, 32, 0.1), (4, 32, 0.9)),
    "5 g64": qp((5, 64, 1)),
    "5 g32": qp((5, 32, 1)),
    "6/5 g128": qp((6, 128, 0.1), (5, 128, 0.9)),
    "6/5 g32": qp((6, 32, 0.1), (5, 32, 0.9)),
    "6 g128": qp((6, 128, 1)),
    "6 g32": qp((6, 32, 1)),
    "8 g32": qp((8, 32, 1)),
    "8 g128": qp((8, 128, 1)),
}

# The linears' short names, in the option tables' column order (ExLlamaV2's conversion/qparams.py,
# qparams_attn and qparams_mlp): the one home of these names, which the architecture table and the
# passes use too.
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
MOE_LINEARS = ("w1", "w3", "w2")  # same columns as MLP_LINEARS, in the same order
QKV_LINEARS = ATTN_LINEARS[:3]
MLP_INPUT_LINEARS = MLP_LINEARS[:2]  # the two that read the MLP's normed input (gate, up)

# columns: q, k, v, o
ATTN_OPTIONS: tuple[tuple[QParams, ...], ...] = tuple(
    tuple(_A[x] for x in row)
    for row in (
        ("3/2 .05", "3/2 .05", "3/2 .05", "3/2 .05"),
        ("3/2 .1", "3/2 .1", "3/2 .25", "3/2 .1"),
        ("3/2 .1", "3/2 .1", "4/3 g128", "3/2 .1"),
        ("3/2 .1", "3/2 .1", "4/3 g128", "4/3 g128"),
        ("4/3 g128", "4/3 g128", "4/3 g128", "4/3 g128"),
        ("4/3 g128", "4/3 g128", "4/3 g64", "4/3 g128"),
        ("4 g128", "4 g128", "4 g128", "4 g128"),
        ("4 g128", "4 g128", "4 g64", "4 g128"),
        ("4 g64", "4 g64", "4 g32", "4 g64"),
        ("4 g32", "4 g32", "4 g32", "4 g32"),
        ("5/4 g128", "5/4 g128", "5/4 g64", "5/4 g128"),
        ("5/4 g64", "5/4 g64", "5/4 g32", "5/4 g64"),
        ("5/4 g64", "5/4 g64", "5 g64", "5/4 g64"),
        ("5/4 g32", "5/4 g32", "5 g32", "5/4 g32"),
        ("6/5 g128", "6/5 g128", "6 g128", "6/5 g128"),
        ("6/5 g32", "6/5 g32", "6 g32", "6/5 g32"),
        ("6 g128", "6 g128", "6 g128", "6 g128"),
        ("6 g32", "6 g32", "8 g32", "6 g32"),
        ("8 g128", "8 g128", "8 g128", "8 g128"),
    )
)

# columns: gate (w1), up (w3), down (w2)
MLP_OPTIONS: tuple[tuple[QParams, ...], ...] = (
    (qp((3, 64, 0.05), (2, 64, 0.95)), qp((3, 64, 0.05), (2, 64, 0.95)),
     qp((6, 32, 0.05), (3, 64, 0.2), (2, 64, 0.75))),
    (qp((3, 64, 0.1), (2, 64, 0.9)), qp((3, 64, 0.25), (2, 64, 0.75)),
     qp((6, 32, 0.05), (3, 64, 0.2), (2, 64, 0.75))),
    (qp((3, 64, 0.1), (2, 64, 0.9)), qp((3, 64, 0.3), (2, 64, 0.7)),
     qp((5, 32, 0.05), (3, 32, 0.95))),
    (qp((3, 64, 0.1), (2, 64, 0.9)), qp((3, 64, 0.3), (2, 64, 0.7)),
     qp((5, 32, 0.05), (4, 32, 0.95))),
    (qp((4, 128, 0.1), (3, 128, 0.9)), qp((4, 128, 0.25), (3, 128, 0.75)),
     qp((8, 32, 0.05), (4, 128, 0.1), (3, 128, 0.85))),
    (qp((4, 32, 0.1), (3, 32, 0.9)), qp((4, 32, 0.25), (3, 32, 0.75)),
     qp((8, 32, 0.05), (4, 32, 0.1), (3, 32, 0.85))),
    (qp((4, 32, 0.1), (3, 32, 0.9)), qp((4, 32, 0.25), (3, 32, 0.75)),
     qp((8, 32, 0.05), (4, 128, 0.95))),
    (qp((4, 128, 1)), qp((4, 32, 1)), qp((8, 32, 0.05), (4, 128, 0.95))),
    (qp((4, 32, 1)), qp((4, 32, 1)), qp((8, 32, 0.05), (4, 32, 0.95))),
    (qp((5, 128, 0.1), (4, 128, 0.9)), qp((5, 128, 0.25), (4, 128, 0.75)),
     qp((8, 32, 0.05), (5, 128, 0.1), (4, 128, 0.85))),
    (qp((5, 32, 0.1), (4, 32, 0.9)), qp((5, 32, 0.25), (4, 32, 0.75)),
     qp((8, 32, 0.05), (5, 32, 0.1), (4, 32, 0.85))),
    (qp((6, 128, 0.1), (5, 128, 0.9)), qp((6, 128, 0.25), (5, 128, 0.75)),
     qp((8, 32, 0.05), (6, 128, 0.1), (5, 128, 0.85))),
    (qp((6, 32, 0.1), (5, 32, 0.9)), qp((6, 32, 0.25), (5, 32, 0.75)),
     qp((8, 32, 0.05), (6, 32, 0.1), (5, 32, 0.85))),
    (qp((6, 128, 1)), qp((6, 128, 1)), qp((8, 32, 0.05), (6, 128, 0.95))),
    (qp((8, 128, 0.1), (6, 128, 0.9)), qp((8, 128, 0.1), (6, 128, 0.9)),
     qp((8, 128, 0.15), (6, 128, 0.85))),
    (qp((8, 128, 0.1), (6, 128, 0.9)), qp((8, 128, 0.1), (6, 128, 0.9)), qp((8, 128, 1))),
    (qp((8, 128, 1)), qp((8, 128, 1)), qp((8, 128, 1))),
)

# -hb: the head's fixed layout (ExLlamaV2's conversion/qparams.py, qparams_headoptions)
HEAD_OPTIONS: dict[int, QParams] = {
    2: qp((4, 32, 0.3), (2, 32, 0.7)),
    3: qp((4, 32, 0.15), (3, 32, 0.85)),
    4: qp((6, 32, 0.15), (4, 32, 0.85)),
    5: qp((6, 128, 0.15), (5, 128, 0.85)),
    6: qp((8, 128, 0.15), (6, 128, 0.85)),
    8: qp((8, 128, 1)),
}


def distinct_columns(options: Iterable[tuple[QParams, ...]]) -> tuple[list[list[QParams]], list[tuple[int, ...]]]:
    """De-duplicate a table by column: the distinct QParams per column in first-appearance
    order, and each row as a tuple of per-column indices into those lists."""
    options = list(options)
    ncol = len(options[0])
    distinct: list[list[QParams]] = [[] for _ in range(ncol)]
    rows = []
    for row in options:
        idx = []
        for c, q in enumerate(row):
            descs = [d.desc for d in distinct[c]]
            if q.desc not in descs:
                distinct[c].append(q)
                descs.append(q.desc)
            idx.append(descs.index(q.desc))
        rows.append(tuple(idx))
    return distinct, rows


def describe_groups(groups: list[Group], k: int) -> str:
    """A description string for a decoded layout. Prefers the matching table entry (so the
    proportions read exactly as ExLlamaV2 wrote them); otherwise derives one from the rows."""
    for q in known_qparams():
        try:
            if q.groups(k) == groups:
                return q.desc
        except ValueError:
            continue
    runs: list[list[int]] = []  # [bits, rows, first group's rows]
    for g in groups:
        if runs and runs[-1][0] == g.bits:
            runs[-1][1] += g.rows
        else:
            runs.append([g.bits, g.rows, g.rows])
    return "/".join(f"{round(r / k, 4)}:{b}b_{gs}g" for b, r, gs in runs) + f" s{SCALE_BITS}"


def known_qparams() -> list[QParams]:
    """Every distinct QParams of the attention, MLP and head tables."""
    seen: dict[str, QParams] = {}
    for table in (ATTN_OPTIONS, MLP_OPTIONS):
        for row in table:
            for q in row:
                seen.setdefault(q.desc, q)
    for q in HEAD_OPTIONS.values():
        seen.setdefault(q.desc, q)
    return list(seen.values())
