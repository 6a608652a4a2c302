"""Calibration rows: the built-in set's procedures (reference 2.1) and parquet files (2.2).

A byte-level tokenizer (token id = byte value, BOS 256, EOS 257) makes every expected row
computable by hand.
"""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exl2conv import calibration
from exl2conv.calibration import builtin_rows, describe_rows, parquet_rows
from exl2conv.errors import Exl2Error, FormatError
from exl2conv.tokenizer import load_tokenizer
from tests.unit.test_tokenizer import write_byte_tokenizer

BOS, EOS = 256, 257


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = write_byte_tokenizer(tmp_path_factory.mktemp("bytes"), {"bos_token_id": BOS, "eos_token_id": EOS})
    return load_tokenizer(folder)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# -- the shipped dataset ----------------------------------------------------------------------

@pytest.mark.parametrize("ctx", [256, 2048])
def test_builtin_shapes_and_determinism(tok, ctx):
    measure = builtin_rows(tok, ctx, "measure")
    quant = builtin_rows(tok, ctx, "quant")
    assert measure.shape == (19, ctx) and quant.shape == (115, ctx)
    assert (calibration.builtin_row_count("measure"), calibration.builtin_row_count("quant")) == (19, 115)
    assert measure.dtype == quant.dtype == torch.long
    assert torch.equal(quant, builtin_rows(tok, ctx, "quant"))
    assert int(quant.min()) >= 0 and int(quant.max()) < tok.vocab_size


def test_builtin_layout_of_shipped_files(tok):
    rows = builtin_rows(tok, 2048, "quant")
    # Row order: c4 10, wiki 48, code 15, tiny 10, multilingual 15, shuffled 5, random 2, technical 10.
    with open(calibration.DATA_DIR / "c4.utf8", encoding="utf-8") as f:
        c4 = "\n\n".join(f.readlines())
    assert rows[0].tolist() == _bytes(c4)[:2048]
    wiki, tiny = rows[10:58], rows[73:83]
    assert (wiki[:24, 0] != BOS).all() and (wiki[24:, 0] == BOS).all()
    assert (tiny[:5, 0] != BOS).all() and (tiny[5:, 0] == BOS).all()
    # Only the wiki and tiny rows hold BOS/EOS (random rows may hit them by chance).
    others = torch.cat([rows[:10], rows[58:73], rows[83:103], rows[105:]])
    assert not ((others == BOS) | (others == EOS)).any()
    code = (calibration.DATA_DIR / "code.utf8").read_text(encoding="utf-8")
    assert rows[58].tolist() == _bytes(code)[:2048]


def test_length_is_capped_at_2048(tok):
    assert builtin_rows(tok, 4096, "measure").shape == (19, 2048)


@pytest.mark.parametrize("length", [100, 1000, 2000, 0])
def test_length_not_multiple_of_128_refused(tok, length):
    with pytest.raises(Exl2Error) as e:
        builtin_rows(tok, length, "quant")
    assert "multiple of 128" in str(e.value) and "-l" in str(e.value)


def test_which_must_be_measure_or_quant(tok):
    with pytest.raises(ValueError):
        builtin_rows(tok, 256, "train")


# -- the procedures, on small synthetic files --------------------------------------------------

CTX = 128


def _article(i: int) -> str:
    # After the header line is dropped: "T<i>\n" + 59 letters + "\n" = 63 bytes, 65 tokens with
    # BOS/EOS, so a 128-token row needs two articles (130 >= 129).
    return f'<doc id="{i}" title="T{i}">\nT{i}\n' + chr(ord("a") + i) * 59 + "\n</doc>\n"


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    files = {
        "c4": "".join(ch * 100 + "\n" for ch in "ABCDE"),
        "wiki": "".join(_article(i) for i in range(8)),   # 4 rows x 2 articles
        "code": "x = 1\n" * 80,                            # 480 bytes: 3 rows
        "tiny": "\n<|endoftext|>\n".join(f"S{i} " + "s" * 60 for i in range(4)),  # 2 rows x 2
        "multilingual": "".join(f"{i:03d}" * 43 for i in range(5))[: 5 * CTX],  # 5 rows
        "technical": "t" * (2 * CTX + 10),
    }
    for name, text in files.items():
        (tmp_path / f"{name}.utf8").write_text(text, encoding="utf-8")
    monkeypatch.setattr(calibration, "DATA_DIR", tmp_path)
    return files


def test_procedures_exactly(tok, data_dir):
    rows = builtin_rows(tok, CTX, "measure")
    assert rows.shape == (19, CTX)

    c4 = _bytes("\n\n".join(ch * 100 + "\n" for ch in "ABCDE"))
    assert rows[0].tolist() == c4[:CTX] and rows[1].tolist() == c4[CTX:2 * CTX]

    art = [[BOS] + _bytes(f"T{i}\n" + chr(ord("a") + i) * 59 + "\n") + [EOS] for i in range(8)]
    # First half: tokens 1..ctx of two articles (no leading BOS, BOS/EOS between them).
    assert rows[2].tolist() == (art[0] + art[1])[1:CTX + 1]
    assert rows[3].tolist() == (art[2] + art[3])[1:CTX + 1]
    # Second half: tokens 0..ctx-1, starting with BOS.
    assert rows[4].tolist() == (art[4] + art[5])[:CTX]
    assert rows[5].tolist() == (art[6] + art[7])[:CTX]
    assert rows[2, 63:65].tolist() == [EOS, BOS]

    code = _bytes(data_dir["code"])
    assert rows[6:9].flatten().tolist() == code[:3 * CTX]

    story = [[BOS] + _bytes(f"S{i} " + "s" * 60) + [EOS] for i in range(4)]
    assert rows[9].tolist() == (story[0] + story[1])[1:CTX + 1]
    assert rows[10].tolist() == (story[2] + story[3])[:CTX]

    multi = _bytes(data_dir["multilingual"])
    assert rows[11:14].flatten().tolist() == multi[:3 * CTX]
    pick = random.Random(69420).randint(0, 4)   # one 128-token chunk per row at ctx 128
    assert rows[14].tolist() == multi[pick * CTX:(pick + 1) * CTX]

    rnd = rows[15:17]
    expected = torch.randint(0, tok.vocab_size, (2, CTX),
                             generator=torch.Generator().manual_seed(calibration.RANDOM_ROWS_SEED))
    assert torch.equal(rnd, expected)

    assert rows[17:19].flatten().tolist() == _bytes(data_dir["technical"])[:2 * CTX]


def test_shuffled_rows_are_chunks_of_the_stream(tok, data_dir):
    ctx = 256  # two chunks per row; the synthetic files hold 2 rows at this length
    (calibration.DATA_DIR / "multilingual.utf8").write_text("".join(f"{i:04d}" * 32 for i in range(20)))
    stream = torch.tensor(_bytes((calibration.DATA_DIR / "multilingual.utf8").read_text()))
    chunks = {tuple(c) for c in stream.view(-1, 128).tolist()}
    for name in ("c4", "code", "technical"):
        (calibration.DATA_DIR / f"{name}.utf8").write_text("z" * 1000)
    wiki = "".join(f'<doc id="{i}">\nT\n' + "w" * 300 + "\n</doc>\n" for i in range(4))
    (calibration.DATA_DIR / "wiki.utf8").write_text(wiki)
    (calibration.DATA_DIR / "tiny.utf8").write_text("\n<|endoftext|>\n".join(["s" * 300] * 2))
    rows = builtin_rows(tok, ctx, "measure")
    shuffled = rows[14]
    parts = shuffled.view(-1, 128).tolist()
    assert len(parts) == 2 and all(tuple(p) in chunks for p in parts)


def test_running_out_of_a_source_is_an_error(tok, data_dir):
    (calibration.DATA_DIR / "wiki.utf8").write_text("".join(_article(i) for i in range(7)))
    # 7 articles + the empty piece after the last </doc> (2 tokens) are not 4 rows of 129.
    with pytest.raises(Exl2Error) as e:
        builtin_rows(tok, CTX, "measure")
    assert "wiki" in str(e.value) and "3 of the 4 rows" in str(e.value)


def test_c4_too_short_is_an_error(tok, data_dir):
    (calibration.DATA_DIR / "c4.utf8").write_text("short\n")
    with pytest.raises(Exl2Error, match=r"c4.*0 of the 2 rows"):
        builtin_rows(tok, CTX, "measure")


# -- parquet ----------------------------------------------------------------------------------

def _write(path, columns: dict, metadata: dict | None = None):
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def test_parquet_columns_joined_with_spaces(tok, tmp_path):
    path = _write(tmp_path / "d.parquet", {"text": ["hello world", "foo", None, "bar"],
                                           "n": [1, 22, 3, None]})
    ids = parquet_rows(tok, path, rows=2, length=9)
    # Row texts "hello world 1", "foo 22", "3", "bar" streamed back to back, no separators.
    stream = _bytes("hello world 1" + "foo 22" + "3" + "bar")
    assert ids.shape == (2, 9) and ids.dtype == torch.long
    assert ids.flatten().tolist() == stream[:18]
    assert torch.equal(ids, parquet_rows(tok, path, rows=2, length=9))


def test_parquet_skips_stored_pandas_index(tok, tmp_path):
    meta = {b"pandas": json.dumps({"index_columns": ["__index_level_0__"], "columns": []}).encode()}
    path = _write(tmp_path / "d.parquet", {"text": ["abcd", "efgh"], "__index_level_0__": [7, 8]}, meta)
    assert parquet_rows(tok, path, rows=1, length=8).tolist() == [_bytes("abcdefgh")]


def test_parquet_stops_at_rows_times_length(tok, tmp_path):
    path = _write(tmp_path / "d.parquet", {"text": [f"row{i:04d}" for i in range(5000)]})
    ids = parquet_rows(tok, path, rows=3, length=16)
    assert ids.flatten().tolist() == _bytes("".join(f"row{i:04d}" for i in range(7)))[:48]


def test_parquet_missing_file(tok, tmp_path):
    with pytest.raises(Exl2Error, match="not found"):
        parquet_rows(tok, tmp_path / "nope.parquet", 1, 8)


def test_parquet_not_parquet(tok, tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("text\nhello\n")
    with pytest.raises(FormatError) as e:
        parquet_rows(tok, path, 1, 8)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_parquet_without_rows(tok, tmp_path):
    path = _write(tmp_path / "d.parquet", {"text": pa.array([], pa.string())})
    with pytest.raises(Exl2Error, match="no rows"):
        parquet_rows(tok, path, 1, 8)


def test_parquet_without_text(tok, tmp_path):
    path = _write(tmp_path / "d.parquet", {"text": ["", None, ""]})
    with pytest.raises(Exl2Error, match="no text"):
        parquet_rows(tok, path, 1, 8)


def test_parquet_not_enough_text_says_how_much(tok, tmp_path):
    path = _write(tmp_path / "d.parquet", {"text": ["abc", "de"]})
    with pytest.raises(Exl2Error) as e:
        parquet_rows(tok, path, rows=4, length=8)
    msg = str(e.value)
    assert "5 tokens found, 32 needed" in msg and "-r/-l" in msg and "-mr/-ml" in msg
    assert "\n" not in msg


# -- log helper -------------------------------------------------------------------------------

def test_describe_rows(tok):
    ids = torch.tensor([_bytes("a" * 40 + "b" * 88), _bytes("c" * 100 + "d" * 28)])
    text = describe_rows(tok, ids)
    first, last = text.split("\n")
    assert first == "First 50 tokens of dataset: " + repr("a" * 40 + "b" * 10)
    assert last == "Last 50 tokens of dataset: " + repr("c" * 22 + "d" * 28)


# -- the real model's tokenizer -----------------------------------------------------------------

def test_smollm2_builds_both_sets(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    measure = builtin_rows(tok, 2048, "measure")
    quant = builtin_rows(tok, 2048, "quant")
    assert measure.shape == (19, 2048) and quant.shape == (115, 2048)
    assert int(quant.max()) < tok.vocab_size == 49152
    assert (quant[34:58, 0] == tok.bos_id).all() and (quant[10:34, 0] != tok.bos_id).all()
    assert "First 50 tokens" in describe_rows(tok, quant)
