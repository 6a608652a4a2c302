"""The model's tokenizer, as much of it as calibration needs.

``tokenizer.json`` (Hugging Face ``tokenizers``) is preferred; ``tokenizer.model``
(SentencePiece) is the fallback, the same order ExLlamaV2 uses. Text is always encoded as
plain text: a special token written in the text (``<s>``, ``<|endoftext|>``) is spelled out
in ordinary pieces, never turned into its special id. BOS and EOS are added only on request.

BOS/EOS ids are looked up the way ExLlamaV2 0.3.2 does it: ``config.json``
(``bos_token_id``, ``eos_token_id``; a list of EOS ids means its first), then
``tokenizer_config.json`` (``bos_token``/``eos_token``, a string or ``{"content": ...}``, looked
up in the vocabulary; an explicit ``null`` means none), then, new here, SentencePiece's own
ids, then ExLlamaV2's defaults 1 and 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from exl2conv.errors import Exl2Error, FormatError

HF_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"

# ExLlamaV2's fallbacks when neither config file names BOS/EOS.
DEFAULT_BOS_ID = 1
DEFAULT_EOS_ID = 2

_ABSENT = object()  # a key missing from tokenizer_config.json, as opposed to an explicit null


class _HFModel:
    """``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise FormatError(f"{path}: not a readable tokenizer.json ({_first_line(e)}); "
                              "replace it with the model's original file") from None
        # Treat special tokens in the text as text (added non-special tokens still match,
        # as in ExLlamaV2).
        self._tok.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        # each text on its own, in parallel across the host's cores (the same ids as one at a time)
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def max_id(self) -> int:
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def own_bos_eos(self) -> tuple[int | None, int | None]:
        return None, None


class _SPModel:
    """``tokenizer.model`` through ``sentencepiece``."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise FormatError(f"{path}: not a readable SentencePiece model ({_first_line(e)}); "
                              "replace it with the model's original file") from None
        self._size = self._sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # SentencePiece refuses ids past its own table (added tokens from
        # tokenizer_config.json can live there); they are dropped from the text.
        return self._sp.DecodeIds([i for i in ids if 0 <= i < self._size])

    def piece_to_id(self, piece: str) -> int | None:
        i = self._sp.PieceToId(piece)
        # PieceToId answers unk for unknown pieces; only an exact match counts.
        return i if self._sp.IdToPiece(i) == piece else None

    def max_id(self) -> int:
        return self._size - 1

    def own_bos_eos(self) -> tuple[int | None, int | None]:
        bos, eos = self._sp.bos_id(), self._sp.eos_id()
        return (bos if bos >= 0 else None), (eos if eos >= 0 else None)


class Tokenizer:
    """Encode/decode plus the ids calibration needs.

    ``vocab_size`` is one plus the largest id the tokenizer knows, added and special tokens
    included (ExLlamaV2's ``get_vocab_size``): the range the random calibration rows draw from.
    """

    def __init__(self, model: _HFModel | _SPModel, path: Path, bos_id: int | None,
                 eos_id: int | None, extra_ids: Sequence[int]):
        self._model = model
        self.path = path
        self.bos_id = bos_id
        self.eos_id = eos_id
        known = [model.max_id(), *extra_ids, *(i for i in (bos_id, eos_id) if i is not None)]
        self.vocab_size = 1 + max(known)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (no special-token parsing); BOS/EOS only when asked for and
        when the model has one."""
        return self._specials(self._model.encode(text) if text else [], add_bos, add_eos)

    def _specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        """``ids`` with BOS/EOS added where asked for and the model has them (in place)."""
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_many(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """:meth:`encode` of each text (a tokenizer.json tokenizes them in parallel)."""
        todo = [i for i, t in enumerate(texts) if t]
        done = dict(zip(todo, self._model.encode_many([texts[i] for i in todo]))) if todo else {}
        return [self._specials(done.get(i, []), add_bos, add_eos) for i in range(len(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens spelled out."""
        return self._model.decode([int(i) for i in ids])


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of the model in ``model_dir`` (tokenizer.json, else tokenizer.model)."""
    model_dir = Path(model_dir)
    hf, spm = model_dir / HF_FILE, model_dir / SPM_FILE
    if hf.is_file():
        model: _HFModel | _SPModel = _HFModel(hf)
        path = hf
    elif spm.is_file():
        model = _SPModel(spm)
        path = spm
    else:
        raise Exl2Error(f"{model_dir}: no tokenizer found; the model folder needs "
                        f"{HF_FILE} (Hugging Face tokenizers) or {SPM_FILE} (SentencePiece)")

    config = _read_json(model_dir / "config.json")
    tok_config = _read_json(model_dir / "tokenizer_config.json")
    bos = _control_id(config.get("bos_token_id"), tok_config.get("bos_token", _ABSENT),
                      model, model.own_bos_eos()[0], DEFAULT_BOS_ID)
    eos = _control_id(config.get("eos_token_id"), tok_config.get("eos_token", _ABSENT),
                      model, model.own_bos_eos()[1], DEFAULT_EOS_ID)
    return Tokenizer(model, path, bos, eos, _added_ids(model_dir, tok_config))


def _control_id(from_config: Any, from_tok_config: Any, model: _HFModel | _SPModel,
                own: int | None, default: int) -> int | None:
    if isinstance(from_config, list):
        from_config = from_config[0] if from_config else None
    if isinstance(from_config, int):
        return from_config
    if from_tok_config is not _ABSENT:
        if isinstance(from_tok_config, dict):
            from_tok_config = from_tok_config.get("content")
        if isinstance(from_tok_config, str):
            return model.piece_to_id(from_tok_config)
        return None  # explicitly null: the model has no such token
    return own if own is not None else default


def _added_ids(model_dir: Path, tok_config: dict) -> list[int]:
    """Ids of added tokens declared outside the tokenizer model itself (ExLlamaV2 counts
    them in the vocabulary size)."""
    ids = [int(k) for k in tok_config.get("added_tokens_decoder", {}) if str(k).isdigit()]
    added = _read_json(model_dir / "added_tokens.json")
    ids += [v for v in added.values() if isinstance(v, int)]
    return ids


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not readable JSON ({_first_line(e)}); "
                          "replace it with the model's original file") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object; replace it with the model's original file")
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
