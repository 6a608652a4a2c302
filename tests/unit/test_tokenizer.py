"""Tokenizer loading: tokenizer.json and tokenizer.model, BOS/EOS lookup, errors."""

import json
from pathlib import Path

import pytest

from exl2conv.errors import Exl2Error, FormatError
from exl2conv.tokenizer import load_tokenizer

SPECIALS = ["<s>", "</s>", "<|endoftext|>"]  # ids 256, 257, 258


def _byte_chars() -> list[str]:
    """The printable stand-in character of every byte, in byte order (GPT-2's byte-level map)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_byte_tokenizer(folder: Path, config: dict | None = None) -> Path:
    """A byte-level BPE tokenizer.json with no merges: token id = byte value, then the
    special tokens <s>=256, </s>=257, <|endoftext|>=258. ``config`` goes to config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def byte_dir(tmp_path):
    return write_byte_tokenizer(tmp_path / "model", {"bos_token_id": 256, "eos_token_id": 257})


# -- tokenizer.json ---------------------------------------------------------------------------

def test_hf_encode_is_bytes_and_decode_round_trips(byte_dir):
    tok = load_tokenizer(byte_dir)
    text = "Héllo, wörld\n\tend"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259


def test_hf_bos_eos_only_on_request(byte_dir):
    tok = load_tokenizer(byte_dir)
    assert (tok.bos_id, tok.eos_id) == (256, 257)
    assert tok.encode("ab") == [97, 98]
    assert tok.encode("ab", add_bos=True) == [256, 97, 98]
    assert tok.encode("ab", add_bos=True, add_eos=True) == [256, 97, 98, 257]
    assert tok.encode("", add_bos=True, add_eos=True) == [256, 257]


def test_special_tokens_in_text_stay_text(byte_dir):
    tok = load_tokenizer(byte_dir)
    text = "a<s>b</s>c<|endoftext|>"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert not set(ids) & {256, 257, 258}


def test_bos_eos_from_tokenizer_config_when_config_lacks_them(tmp_path):
    folder = write_byte_tokenizer(tmp_path, {"eos_token_id": [258, 257]})
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}))
    tok = load_tokenizer(folder)
    assert tok.bos_id == 256          # tokenizer_config, dict form
    assert tok.eos_id == 258          # config.json wins; a list means its first


def test_explicit_null_bos_means_none(tmp_path):
    folder = write_byte_tokenizer(tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    tok = load_tokenizer(folder)
    assert tok.bos_id is None and tok.eos_id == 257
    assert tok.encode("x", add_bos=True, add_eos=True) == [120, 257]


def test_defaults_when_nothing_names_bos_eos(tmp_path):
    tok = load_tokenizer(write_byte_tokenizer(tmp_path))
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # ExLlamaV2's fallbacks


def test_vocab_size_counts_added_tokens_declared_elsewhere(tmp_path):
    folder = write_byte_tokenizer(tmp_path, {"bos_token_id": 256, "eos_token_id": 257})
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"300": {"content": "<pad>", "special": True}}}))
    assert load_tokenizer(folder).vocab_size == 301


# -- tokenizer.model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([
        "the quick brown fox jumps over the lazy dog",
        "a tokenizer turns text into pieces and pieces into ids",
        "calibration data for quantization comes from many kinds of text",
        "<s> and </s> are control symbols, not text",
    ] * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=80,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder


def test_sentencepiece_fallback(spm_dir):
    tok = load_tokenizer(spm_dir)
    assert tok.path.name == "tokenizer.model"
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # SentencePiece's own ids
    text = "the lazy fox turns text into ids"
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text
    assert tok.encode(text, add_bos=True, add_eos=True) == [1, *ids, 2]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert tok.vocab_size == sp.get_piece_size() > max(ids)


def test_sentencepiece_control_symbols_in_text_stay_text(spm_dir):
    tok = load_tokenizer(spm_dir)
    ids = tok.encode("<s> fox </s>")
    assert 1 not in ids and 2 not in ids


def test_tokenizer_json_preferred_over_model(spm_dir, tmp_path):
    folder = write_byte_tokenizer(tmp_path)
    (folder / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    assert load_tokenizer(folder).path.name == "tokenizer.json"


# -- errors -----------------------------------------------------------------------------------

def test_missing_tokenizer_names_folder_and_files(tmp_path):
    with pytest.raises(Exl2Error) as e:
        load_tokenizer(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "tokenizer.model" in msg
    assert "\n" not in msg


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(FormatError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage, not a protobuf\xff" * 10)
    with pytest.raises(FormatError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(e.value) and "\n" not in str(e.value)


def test_corrupt_config_json(tmp_path):
    folder = write_byte_tokenizer(tmp_path)
    (folder / "config.json").write_text("{bos_token_id: 1")
    with pytest.raises(FormatError) as e:
        load_tokenizer(folder)
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize("which", ["hf", "spm"])
def test_encode_many_is_encode_of_each_text(which, byte_dir, spm_dir):
    """encode_many (the calibration set's parallel path) gives each text's own encode, BOS/EOS
    included, empty texts too."""
    tok = load_tokenizer(byte_dir if which == "hf" else spm_dir)
    texts = ["Hello world", "", "a\nb  c", "naïve café " * 50, "<s> text </s>"]
    for bos, eos in ((False, False), (True, True), (True, False)):
        want = [tok.encode(t, add_bos=bos, add_eos=eos) for t in texts]
        assert tok.encode_many(texts, add_bos=bos, add_eos=eos) == want
    assert tok.encode_many([]) == []
