"""config.json -> ModelConfig, checked for what EXL2 conversion needs.

Every failure is one :class:`Exl2Error` line naming config.json and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Exl2Error
from . import layouts
from .arch import ARCHS, PAD
from .moe_config import flat_dbrx, moe_fields
from .weights import WeightIndex

# RoPE scaling types we compute: the Llama family's (ExLlamaV2 reads rope_scaling in its config.py,
# ExLlamaV2Config.prepare). "dynamic" NTK, which ExLlamaV2 ignores, equals plain RoPE up to
# max_position_embeddings, and calibration rows are at most 2048 tokens, so it computes as none.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_REQUIRED = object()


@dataclass(frozen=True)
class ModelConfig:
    """What the converter reads from config.json (plus the -rs/-ra calibration overrides).

    ``rope_scale`` is the linear position divisor in effect: the config's "linear" factor, or
    -rs when given (which replaces it, as ExLlamaV2's ``scale_pos_emb``). ``rope_alpha`` is the
    NTK alpha (-ra): the effective base is ``rope_theta * alpha ** (head_dim / (head_dim - 2))``.
    ``rope_scaling`` is the config's dict with its type under "rope_type", or None.
    ``sliding_window`` is read for Mistral and Mixtral only; at the calibration lengths (<= 2048)
    it matters only for windows shorter than the row, which :func:`forward.attention` then applies.
    ``num_experts`` / ``num_experts_per_tok`` are an MoE model's experts per layer and experts
    routed per token (``num_local_experts`` or ``num_experts``, and ``num_experts_per_tok``, in
    config.json; DBRX's under ffn_config: moe_config); 0 for a dense model."""

    model_dir: Path
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None
    rope_scale: float = 1.0
    rope_alpha: float = 1.0
    # Gemma2/3: which layers use the sliding window (empty: every layer uses sliding_window),
    # the attention-score and logit tanh caps, the attention scale (None: 1/sqrt(head_dim)),
    # and Gemma3's RoPE base for sliding layers (plain RoPE, no scaling).
    sliding_layers: tuple[bool, ...] = ()
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None
    rope_local_theta: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # Whether the top-k routing weights are divided by their sum (Qwen3-MoE's norm_topk_prob, DBRX's
    # moe_normalize_expert_weights; Mixtral always), and DBRX's clamp on q, k, v (clip_qkv): see
    # moe_config, which reads them.
    moe_renormalize: bool = True
    clip_qkv: float | None = None
    # The prefix the checkpoint puts before every name, where the architecture allows one
    # (ArchSpec.optional_prefix); "" otherwise.
    source_prefix: str = ""
    # "in_memory": a vision-language checkpoint under transformers' in-memory names
    # (exl2conv.model.layouts); "": the hub's.
    source_layout: str = ""
    # Read for every architecture, as ExLlamaV2 0.3.2's config.py reads them (Granite, MiniCPM and
    # Index are the models that set them): the embeddings' factor (scale_emb or
    # embedding_multiplier), the factor on every attention and MLP output before it joins the
    # residual stream (residual_multiplier, or scale_depth / sqrt(layers)), the logits' factor
    # (logit_scale; 1 / logits_scaling; MiniCPM's / (hidden / dim_model_base)), whether the head's
    # rows are L2-normalized before use (norm_head), and the share of each head's dimensions that
    # RoPE rotates (partial_rotary_factor).
    embedding_multiplier: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    norm_head: bool = False
    partial_rotary_factor: float = 1.0
    # Cohere's use_qk_norm (Command R+): a LayerNorm over each head's q and k before RoPE, with a
    # weight per head ([heads, head_dim]); Qwen3's and Gemma3's RMS head norms are ArchSpec.qk_norm.
    use_qk_norm: bool = False
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def norm_offset(self) -> float:
        """Added to every RMSNorm weight at load (Gemma stores w - 1)."""
        return ARCHS[self.arch].norm_offset

    @property
    def embed_scale(self) -> float:
        """Factor on the embeddings: sqrt(hidden_size) for Gemma, times the config's multiplier."""
        base = math.sqrt(self.hidden_size) if ARCHS[self.arch].embed_scale else 1.0
        return base * self.embedding_multiplier

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions RoPE rotates (the first ones), as ExLlamaV2 rounds
        head_dim * partial_rotary_factor; even."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full causal attention."""
        if self.sliding_layers and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def rope_base(self) -> float:
        """rope_theta with the NTK alpha applied."""
        if self.rope_alpha == 1.0:
            return self.rope_theta
        return self.rope_theta * self.rope_alpha ** (self.rotary_dim / (self.rotary_dim - 2))


class _Reader:
    """Typed field access on the parsed JSON, with errors that name the file and the field."""

    def __init__(self, path: Path, raw: dict):
        self.path, self.raw = path, raw

    def fail(self, what: str) -> Exl2Error:
        return Exl2Error(f"{self.path}: {what}")

    def int(self, key: str, default: Any = _REQUIRED, positive: bool = True) -> Any:
        v = self.raw.get(key)
        if v is None:
            if default is _REQUIRED:
                raise self.fail(f"required field {key!r} is missing")
            return default
        if isinstance(v, bool) or not isinstance(v, int) or (positive and v <= 0):
            raise self.fail(f"field {key!r} must be a positive integer, not {v!r}")
        return v

    def float(self, key: str, default: float) -> float:
        v = self.raw.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise self.fail(f"field {key!r} must be a positive number, not {v!r}")
        return float(v)

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.raw.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(f"field {key!r} must be true or false, not {v!r}")
        return v


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise Exl2Error(f"{path} not found; -i must name a Hugging Face model folder with config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise Exl2Error(f"{path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise Exl2Error(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise Exl2Error(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


def _arch(r: _Reader) -> str:
    archs = r.raw.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise r.fail("required field 'architectures' is missing or not a list of names; "
                     f"supported: {', '.join(ARCHS)}")
    if archs[0] not in ARCHS:
        raise r.fail(f"architectures[0] is {archs[0]!r}, which exl2conv does not support; "
                     f"supported: {', '.join(ARCHS)}")
    tower = ARCHS[archs[0]].vision_model_type
    vision = r.raw.get("vision_config")
    found = vision.get("model_type") if isinstance(vision, dict) else None
    if tower and found != tower:
        raise r.fail(f"{archs[0]} with vision_config.model_type {found!r}: ExLlamaV2 0.3.2 converts and runs "
                     f"{archs[0]} only with a {tower!r} vision tower, so this model is not converted; "
                     f"supported: {', '.join(ARCHS)}")
    return archs[0]


def _rope(r: _Reader, params_key: str | None = None) -> tuple[float, dict | None]:
    """(rope_theta, normalized rope_scaling or None). Reads the classic ``rope_theta`` +
    ``rope_scaling`` fields and the newer ``rope_parameters`` dict (transformers 5), or the
    entry ``params_key`` of it where it is keyed by layer type (Gemma3)."""
    theta = r.float("rope_theta", 10000.0)
    scaling = r.raw.get("rope_scaling")
    key = "rope_scaling"
    params = r.raw.get("rope_parameters")
    if params_key is not None and isinstance(params, dict):
        params = params.get(params_key)
    if scaling is None and isinstance(params, dict):
        key = "rope_parameters"
        if params.get("rope_theta") is not None:
            theta = _Reader(r.path, params).float("rope_theta", theta)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise r.fail(f"field {key!r} must be an object, not {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "mrope" and ARCHS[r.raw["architectures"][0]].mrope:
        kind = "default"  # Qwen2-VL's hub form, {"type": "mrope", "mrope_section": ...}: plain RoPE for text
    if kind not in ROPE_TYPES:
        raise r.fail(f"{key}.rope_type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": kind}
    sr = _Reader(r.path, scaling)
    needed = {"linear": ("factor",), "dynamic": (), "llama3": _LLAMA3_KEYS, "yarn": ("factor",)}[kind]
    for k in needed:
        if scaling.get(k) is None:
            raise r.fail(f"{key} of type {kind!r} needs field {k!r}")
        sr.float(k, 1.0)
    return theta, scaling


def _eos(r: _Reader) -> tuple[int, ...]:
    v = r.raw.get("eos_token_id")
    ids = v if isinstance(v, list) else [] if v is None else [v]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise r.fail(f"field 'eos_token_id' must be an integer or a list of integers, not {v!r}")
    return tuple(ids)


def _check_dims(r: _Reader, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int):
    if heads % kv_heads:
        raise r.fail(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    if head_dim % 2:
        raise r.fail(f"head_dim ({head_dim}) must be even for rotary embeddings")
    for name, k in (("hidden_size", hidden), ("intermediate_size", inter),
                    ("num_attention_heads * head_dim", heads * head_dim)):
        if k % PAD:
            raise r.fail(f"{name} is {k}, not a multiple of {PAD}; EXL2 quantizes input features "
                         f"in groups of {PAD}, so this model cannot be converted")


# Gemma3's text config as transformers defaults it: real config.json files leave these out.
_GEMMA3_TEXT_DEFAULTS = {
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "sliding_window": 4096, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6, "tie_word_embeddings": True,
}


def _text_fields(raw: dict, arch: str) -> dict:
    """The language model's fields: Gemma3ForConditionalGeneration and the vision-language models
    nest them in text_config (a flat Qwen2-VL config is read as it is)."""
    if not ARCHS[arch].text_config:
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        text = {}
    merged = dict(_GEMMA3_TEXT_DEFAULTS if arch == "Gemma3ForConditionalGeneration" else {})
    merged.update({k: v for k, v in raw.items() if k != "text_config"})
    merged.update(text)
    return merged


def _sliding_layers(r: _Reader, num_layers: int, pattern: int | None) -> tuple[bool, ...]:
    """Which layers attend through the sliding window: config.json's layer_types, else every
    P-th layer global (``sliding_window_pattern``, default ``pattern``), else (``pattern`` None
    and no such key: Gemma2) the even layers."""
    types = r.raw.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return tuple(t == "sliding_attention" for t in types)
    if pattern is not None or "sliding_window_pattern" in r.raw:
        pattern = r.int("sliding_window_pattern", r.raw.get("_sliding_window_pattern") or pattern or 6)
        return tuple(bool((i + 1) % pattern) for i in range(num_layers))
    return tuple(i % 2 == 0 for i in range(num_layers))


def _gemma_fields(r: _Reader, num_layers: int) -> dict:
    """Gemma2/3: per-layer windows, softcaps, attention scale, Gemma3's local RoPE base."""
    sliding = _sliding_layers(r, num_layers, 6 if r.raw.get("model_type", "").startswith("gemma3") else None)
    local = None
    if ARCHS[r.raw["architectures"][0]].qk_norm:  # Gemma3 has a local RoPE base
        params = r.raw.get("rope_parameters")
        local = r.float("rope_local_base_freq", 10_000.0)
        if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
            local = _Reader(r.path, params["sliding_attention"]).float("rope_theta", local)
    return dict(
        sliding_layers=sliding,
        attn_softcap=r.float("attn_logit_softcapping", None),
        final_softcap=r.float("final_logit_softcapping", None),
        attn_scale=r.float("query_pre_attn_scalar", 256.0) ** -0.5,
        rope_local_theta=local,
    )


def _attention_scale(r: _Reader) -> float | None:
    """The attention's softmax scale where the config sets one: attention_multiplier (Granite),
    else query_pre_attn_scalar ** -0.5; None: 1 / sqrt(head_dim)."""
    if r.raw.get("attention_multiplier") is not None:
        return r.float("attention_multiplier", 1.0)
    if r.raw.get("query_pre_attn_scalar") is not None:
        return r.float("query_pre_attn_scalar", 1.0) ** -0.5
    return None


def _first(r: _Reader, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` present (not null) in the config, or None."""
    return next((k for k in keys if r.raw.get(k) is not None), None)


def _key(r: _Reader, keys: tuple[str, ...]) -> str:
    """The first of ``keys`` present in the config, else the first (whose absence errors name)."""
    return _first(r, keys) or keys[0]


def _activation(r: _Reader, arch: str) -> None:
    spec = ARCHS[arch]
    act = r.raw.get("hidden_act") or r.raw.get("hidden_activation") or r.raw.get("activation_function") or spec.act
    if act not in (spec.act_names or (spec.act,)):
        raise r.fail(f"hidden_act is {act!r}; {arch} is supported with {spec.act!r} only")


def _scales(r: _Reader, arch: str, hidden: int, num_layers: int) -> dict:
    """The multipliers and options ExLlamaV2 reads whatever the architecture (ModelConfig)."""
    emb = r.float(_key(r, ("scale_emb", "embedding_multiplier")), 1.0)
    if r.raw.get("residual_multiplier") is not None:
        residual = r.float("residual_multiplier", 1.0)
    elif r.raw.get("scale_depth") is not None:
        residual = r.float("scale_depth", 1.0) / math.sqrt(num_layers)
    else:
        residual = 1.0
    logit = r.float("logit_scale", 1.0)
    if ARCHS[arch].logit_scale_basedim:
        logit /= hidden / r.float("dim_model_base", float(hidden))
    if r.raw.get("logits_scaling") is not None:
        logit = 1.0 / r.float("logits_scaling", 1.0)
    partial = r.raw.get("partial_rotary_factor")
    params = r.raw.get("rope_parameters")
    if partial is None and isinstance(params, dict):
        partial = params.get("partial_rotary_factor")
    partial = 1.0 if partial is None else _Reader(r.path, {"partial_rotary_factor": partial}).float(
        "partial_rotary_factor", 1.0)
    if partial > 1.0:
        raise r.fail(f"field 'partial_rotary_factor' must be at most 1, not {partial}")
    return dict(embedding_multiplier=emb, residual_scale=residual, logit_scale=logit,
                norm_head=bool(r.raw.get("norm_head")), partial_rotary_factor=partial)


def _intermediate(r: _Reader, spec, hidden: int) -> int:
    """The MLP's width: an MoE expert's where the config has moe_intermediate_size (Qwen3-MoE; as
    ExLlamaV2's config.py reads it for any MoE architecture), else intermediate_size or n_inner;
    GPTBigCode's n_inner may be null: 4 x hidden, as transformers builds it."""
    if spec.moe and r.raw.get("moe_intermediate_size") is not None:
        return r.int("moe_intermediate_size")
    key = _first(r, ("intermediate_size", "n_inner"))
    return r.int(key) if key or not spec.positions else 4 * hidden


def _source_names(model_dir: Path, spec) -> dict[str, str]:
    """ModelConfig's source_prefix and source_layout for the checkpoint (headers only):
    ``spec.optional_prefix`` where its tensor names start with it, and its layout
    (exl2conv.model.layouts)."""
    if not spec.optional_prefix and layouts.in_memory_fields(spec) is None:
        return {}
    try:
        names = WeightIndex(model_dir).entries
    except Exl2Error:
        return {}  # the weights' own check reports what is wrong with them
    prefix = spec.optional_prefix if spec.optional_prefix and any(n.startswith(spec.optional_prefix)
                                                                   for n in names) else ""
    return {"source_prefix": prefix, "source_layout": layouts.source_layout(spec, names)}


def load_config(model_dir: str | Path, rope_scale: float | None = None,
                rope_alpha: float | None = None) -> ModelConfig:
    """Read and check ``model_dir/config.json``. ``rope_scale`` (-rs) and ``rope_alpha`` (-ra)
    set the RoPE used for calibration (see :class:`ModelConfig`)."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    r = _Reader(path, _read_json(path))
    arch = _arch(r)
    r = _Reader(path, flat_dbrx(r.raw) if arch == "DbrxForCausalLM" else _text_fields(r.raw, arch))
    spec = ARCHS[arch]
    # the older names GPT-style configs use (n_embd, ...), which ExLlamaV2 reads for every architecture
    hidden = r.int(_key(r, ("hidden_size", "n_embd")))
    inter = _intermediate(r, spec, hidden)
    heads = r.int(_key(r, ("num_attention_heads", "n_head")))
    kv_heads = r.int("num_key_value_heads", heads)
    if spec.mqa:
        if r.raw.get("multi_query") is False:
            raise r.fail(f"multi_query is false: ExLlamaV2 0.3.2 runs every {arch} with one key/value head, so "
                         "its EXL2 output would run wrongly; the model is not converted")
        kv_heads = 1
    if r.raw.get("head_dim") is None and hidden % heads:
        raise r.fail(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) "
                     f"and there is no head_dim field")
    head_dim = r.int("head_dim", hidden // heads)
    _check_dims(r, hidden, inter, heads, kv_heads, head_dim)
    _activation(r, arch)
    if spec.qkv_interleaved and r.bool("bias"):
        raise r.fail(f"field 'bias' is true, and ExLlamaV2 0.3.2 reads no biases for {arch}: its EXL2 output "
                     "would run without them, so the model is not converted")
    nested = isinstance(r.raw.get("rope_parameters"), dict) and "full_attention" in r.raw["rope_parameters"]
    theta, scaling = _rope(r, "full_attention" if nested else None)
    scale = float(scaling["factor"]) if scaling and scaling["rope_type"] == "linear" else 1.0
    for flag, v in (("-rs/--rope_scale", rope_scale), ("-ra/--rope_alpha", rope_alpha)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise Exl2Error(f"{flag} must be a positive number, not {v}")
    bos = r.raw.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise r.fail(f"field 'bos_token_id' must be an integer, not {bos!r}")
    num_layers = r.int(_key(r, ("num_hidden_layers", "n_layer")))
    window = r.int("sliding_window", None) if spec.sliding_window or spec.gemma else None
    attention = _gemma_fields(r, num_layers) if spec.gemma else {"attn_scale": _attention_scale(r)}
    if spec.rope_sliding_only:  # Cohere2: three sliding layers, then a global one (transformers' default)
        attention["sliding_layers"] = _sliding_layers(r, num_layers, 4)
    scales = _scales(r, arch, hidden, num_layers)
    if scales["partial_rotary_factor"] * head_dim < 2:
        raise r.fail(f"partial_rotary_factor {scales['partial_rotary_factor']} leaves no dimension of a "
                     f"{head_dim}-wide head to rotate")
    moe = moe_fields(r, arch, num_layers) if spec.moe else {}
    return ModelConfig(
        **_source_names(model_dir, spec),
        model_dir=model_dir,
        arch=arch,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=r.int("vocab_size"),
        norm_eps=r.float(_key(r, spec.eps_keys), spec.default_eps) if spec.eps_keys else spec.default_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=r.int(_key(r, ("max_position_embeddings", "n_positions")), 2048),
        tie_word_embeddings=r.bool("tie_word_embeddings"),
        attention_bias=r.bool("attention_bias"),
        mlp_bias=r.bool("mlp_bias"),
        bos_token_id=bos,
        eos_token_ids=_eos(r),
        sliding_window=window,
        use_qk_norm=spec.parallel and r.bool("use_qk_norm"),
        rope_scale=float(rope_scale) if rope_scale is not None else scale,
        rope_alpha=float(rope_alpha) if rope_alpha is not None else 1.0,
        raw=r.raw,
        **attention,
        **moe,
        **scales,
    )
