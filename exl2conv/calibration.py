"""Calibration token rows: the built-in dataset and parquet files.

The built-in set is formed exactly as ExLlamaV2 0.3.2 forms its own (its
conversion/tokenize.py, get_standard_calibration): the same six kinds of text, the same row
counts and order, the same rules for joining, cutting and placing BOS/EOS, the same
Python-seeded shuffle. The text itself is our own (exl2conv/data/, sources in
docs/calibration.md). Two deliberate differences: the random-token rows come from a fixed-seed
generator, so the rows are identical every run, and a row length that is not a multiple of 128
is refused up front (ExLlamaV2 crashes on it).

Everything here is a pure function of (tokenizer, files, arguments): same inputs, same
tensor.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch

from exl2conv.errors import Exl2Error, FormatError
from exl2conv.job import ROWS_USED
from exl2conv.tokenizer import Tokenizer

DATA_DIR = Path(__file__).resolve().parent / "data"

MAX_CTX = 2048           # built-in rows are never longer (longer lengths are capped)
CHUNK = 128              # shuffled multilingual rows are made of chunks this long
SHUFFLE_SEED = 69420     # ExLlamaV2's seed for Python's random
DOC_BATCH = 32           # documents tokenized at once (in parallel) while rows are formed
RANDOM_ROWS_SEED = 0x45584C32  # "EXL2"; ExLlamaV2 leaves these rows unseeded
TINY_SEPARATOR = "<|endoftext|>"
WIKI_SEPARATOR = "</doc>\n"
PRINT_TOKENS = 50

# Rows per source, (measure, quant), in the order the rows are stacked.
BUILTIN_ROWS = {
    "c4": (2, 10),
    "wiki": (4, 48),
    "code": (3, 15),
    "tiny": (2, 10),
    "multilingual": (3, 15),
    "multilingual_shuffled": (1, 5),
    "random": (2, 2),
    "technical": (2, 10),
}

Which = Literal["measure", "quant"]


def builtin_row_count(which: Which) -> int:
    """Rows in the built-in set: 19 for ``"measure"``, 115 for ``"quant"`` (these replace
    -mr/-r, as in ExLlamaV2)."""
    return sum(counts[which == "quant"] for counts in BUILTIN_ROWS.values())


def builtin_rows(tok: Tokenizer, length: int, which: Which) -> torch.LongTensor:
    """The built-in calibration set, shape ``[19, ctx]`` for ``"measure"`` or ``[115, ctx]``
    for ``"quant"``, with ``ctx = min(2048, length)``. Raises Exl2Error when ``ctx`` is not
    a positive multiple of 128 or a source file has too little text for its rows."""
    if which not in ("measure", "quant"):
        raise ValueError(f"which must be 'measure' or 'quant', not {which!r}")
    ctx = min(MAX_CTX, length)
    if ctx <= 0 or ctx % CHUNK:
        flag = "-ml" if which == "measure" else "-l"
        raise Exl2Error(f"{flag} {length}: the built-in calibration set needs a row length that "
                        f"is a multiple of {CHUNK} (for example {max(CHUNK, length // CHUNK * CHUNK)})")
    n = {name: counts[which == "quant"] for name, counts in BUILTIN_ROWS.items()}

    # the four whole-text sources tokenized at once (in parallel where the tokenizer can)
    c4, multilingual, code, technical = (
        _rows_of(ids, ctx) for ids in tok.encode_many([_c4_text(), _read_text("multilingual"), _read_text("code"),
                                                       _read_text("technical")]))
    parts = [
        _first_rows(c4, n["c4"], "c4"),
        _document_rows(tok, _wiki_articles(), n["wiki"], ctx, "wiki"),
        _first_rows(code, n["code"], "code"),
        _document_rows(tok, _tiny_stories(), n["tiny"], ctx, "tiny"),
        _first_rows(multilingual, n["multilingual"], "multilingual"),
        _shuffled_rows(multilingual, n["multilingual_shuffled"], ctx),
        _random_rows(tok.vocab_size, n["random"], ctx),
        _first_rows(technical, n["technical"], "technical"),
    ]
    return torch.cat(parts, dim=0)


# -- the six sources --------------------------------------------------------------------------

def _data_path(name: str) -> Path:
    return DATA_DIR / f"{name}.utf8"


def _read_text(name: str, lines: bool = False) -> str | list[str]:
    """The file's text, or its lines (each with its newline) when ``lines``."""
    path = _data_path(name)
    try:
        # Text mode (universal newlines), as ExLlamaV2 reads them.
        with open(path, encoding="utf-8") as f:
            return f.readlines() if lines else f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise Exl2Error(f"{path}: built-in calibration file unreadable ({e}); "
                        "reinstall exl2conv or pass a parquet file with -c") from None


def _c4_text() -> str:
    # Lines keep their newline and are joined with another blank line: ExLlamaV2's exact text.
    return "\n\n".join(_read_text("c4", lines=True))


def _wiki_articles() -> list[str]:
    # Each article loses its first line, the <doc ...> header; the piece after the last
    # </doc> (normally empty) counts as an article too, as in ExLlamaV2.
    return [a[a.find("\n") + 1:] for a in _read_text("wiki").split(WIKI_SEPARATOR)]


def _tiny_stories() -> list[str]:
    return [s.strip() for s in _read_text("tiny").split(TINY_SEPARATOR)]


# -- row forming ------------------------------------------------------------------------------

def _rows_of(ids: list[int], ctx: int) -> torch.Tensor:
    """Token ids cut to a whole number of rows, shape ``[R, ctx]``."""
    usable = len(ids) - len(ids) % ctx
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, ctx)


def _first_rows(rows: torch.Tensor, n: int, source: str) -> torch.Tensor:
    """The first ``n`` rows of ``rows`` ``[R, ctx]`` -> ``[n, ctx]``."""
    if rows.shape[0] < n:
        _ran_out(source, n, rows.shape[0])
    return rows[:n]


def _document_rows(tok: Tokenizer, docs: list[str], n: int, ctx: int, source: str) -> torch.Tensor:
    """Rows of whole documents, each tokenized with BOS and EOS, shape ``[n, ctx]``.

    A row takes the next unused documents until it holds at least ``ctx + 1`` tokens; the
    rest of its last document is discarded. The first ``n // 2`` rows keep tokens
    ``1..ctx`` (no leading BOS), the others ``0..ctx-1`` (leading BOS)."""
    rows = []
    idx = 0
    encoded: list[list[int]] = []  # documents idx, idx + 1, ... already tokenized
    for r in range(n):
        ids: list[int] = []
        while len(ids) < ctx + 1:
            if idx >= len(docs):
                _ran_out(source, n, r)
            # Tokenized on demand, DOC_BATCH at a time: a document past the last one used never matters.
            if not encoded:
                encoded = tok.encode_many(docs[idx:idx + DOC_BATCH], add_bos=True, add_eos=True)[::-1]
            ids += encoded.pop()
            idx += 1
        start = 1 if r < n // 2 else 0
        rows.append(ids[start:start + ctx])
    return torch.tensor(rows, dtype=torch.long).view(n, ctx)


def _shuffled_rows(rows: torch.Tensor, n: int, ctx: int) -> torch.Tensor:
    """``n`` rows of random 128-token chunks of ``rows`` ``[R, ctx]`` -> ``[n, ctx]``."""
    chunks = rows.reshape(-1, CHUNK)
    rng = random.Random(SHUFFLE_SEED)  # the draws of random.seed(69420); random.randint
    picks = [[rng.randint(0, chunks.shape[0] - 1) for _ in range(ctx // CHUNK)] for _ in range(n)]
    return chunks[torch.tensor(picks, dtype=torch.long)].reshape(n, ctx)


def _random_rows(vocab_size: int, n: int, ctx: int) -> torch.Tensor:
    """``[n, ctx]`` uniform token ids in ``[0, vocab_size)``, from a fixed seed."""
    gen = torch.Generator().manual_seed(RANDOM_ROWS_SEED)
    return torch.randint(0, vocab_size, (n, ctx), generator=gen, dtype=torch.long)


def _ran_out(source: str, needed: int, made: int):
    raise Exl2Error(f"{_data_path(source)}: the built-in {source} text gives only {made} of the "
                    f"{needed} rows needed with this tokenizer; use a shorter length (-l/-ml) "
                    "or a parquet dataset (-c)")


# -- parquet ----------------------------------------------------------------------------------

def parquet_rows(tok: Tokenizer, path: Path, rows: int, length: int) -> torch.LongTensor:
    """Rows from a parquet file (ExLlamaV2's conversion/tokenize.py, get_tokens), shape
    ``[rows, length]``.

    Each table row becomes one text: the text of every column's value (nulls left out)
    joined with single spaces. The texts are tokenized without BOS/EOS and their tokens
    concatenated, ignoring row boundaries, until ``rows * length`` are collected."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    needed = rows * length
    if rows <= 0 or length <= 0:
        raise Exl2Error(f"{path}: cannot make {rows} rows of {length} tokens; rows and length must be positive")
    if not path.is_file():
        raise Exl2Error(f"{path}: calibration dataset not found; check the -c path")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise FormatError(f"{path}: not a readable parquet file ({_first_line(e)}); "
                          "pass a .parquet file with -c") from None
    if pf.metadata.num_rows == 0:
        raise Exl2Error(f"{path}: the parquet file has no rows; pass a dataset with text in it")

    columns = _data_columns(pf.schema_arrow)
    ids: list[int] = []
    try:
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            for text in _row_texts(batch):
                if text:
                    ids += tok.encode(text)
                if len(ids) >= needed:
                    return torch.tensor(ids[:needed], dtype=torch.long).view(rows, length)
    except (OSError, pa.ArrowException) as e:
        raise FormatError(f"{path}: parquet data unreadable ({_first_line(e)})") from None
    if not ids:
        raise Exl2Error(f"{path}: the parquet file holds no text (every row is empty); "
                        "pass a dataset with text in it")
    raise Exl2Error(f"{path}: not enough text: {len(ids)} tokens found, {needed} needed "
                    f"({rows} rows x {length}); use fewer or shorter rows (-r/-l, or -mr/-ml "
                    "for the measurement) or a larger dataset")


def _data_columns(schema) -> list[str]:
    """Every column except a stored pandas index, which pandas reads back as the index
    rather than as data (ExLlamaV2 reads the file through pandas)."""
    index = set()
    meta = schema.pandas_metadata or {}
    for col in meta.get("index_columns", []):
        if isinstance(col, str):  # a RangeIndex is described by a dict and stores no column
            index.add(col)
    return [name for name in schema.names if name not in index]


def _row_texts(batch) -> list[str]:
    values = [col.to_pylist() for col in batch.columns]
    return [" ".join(str(v) for v in row if v is not None) for row in zip(*values)]


# -- logging ----------------------------------------------------------------------------------

def describe_rows(tok: Tokenizer, ids: torch.Tensor, count: int = PRINT_TOKENS) -> str:
    """Two log lines: the decoded first ``count`` tokens of row 0 and last ``count`` of the
    last row of ``ids`` ``[rows, length]``."""
    first = tok.decode(ids[0, :count].tolist())
    last = tok.decode(ids[-1, -count:].tolist())
    return (f"First {count} tokens of dataset: {first!r}\n"
            f"Last {count} tokens of dataset: {last!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def quant_rows(job) -> int:  # job: exl2conv.job.Job
    """quantization_config's calibration rows: -r with a parquet dataset, the built-in set's own
    count without one (as ExLlamaV2 writes them)."""
    if job["cal_dataset"]:
        return int(job["dataset_rows"])
    return int((job[ROWS_USED] or {}).get("quant") or builtin_row_count("quant"))
