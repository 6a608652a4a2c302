"""Architecture table: which HF tensors make up a model and how each linear is shaped.

Each supported ``architectures[0]`` string maps to an :class:`ArchSpec` (plain data, its fields in
:mod:`exl2conv.model.archspec`). A new Llama-like architecture is a new table entry; one that
computes differently (Gemma's norm offset, Phi-3's fused sources, Mixtral's experts) adds a field
there and a small hook in :mod:`exl2conv.model.forward` that reads it.

Shapes follow HF: a linear's weight is ``[out_features, in_features]``. ExLlamaV2 works on
the transpose ``[K, N]`` with K = in_features and N = out_features padded to a multiple of 32.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import Exl2Error
from ..qparams import ATTN_LINEARS, MLP_INPUT_LINEARS, MLP_LINEARS, MOE_LINEARS, QKV_LINEARS
from . import layouts
from .archspec import ArchSpec

if TYPE_CHECKING:  # config imports this module; a runtime import would be circular
    from .config import ModelConfig
    from .weights import WeightIndex

PAD = 32


def ceil32(n: int) -> int:
    return -(-n // PAD) * PAD


_PHI3_FUSED = (("q_proj", "self_attn.qkv_proj", 0), ("k_proj", "self_attn.qkv_proj", 1),
               ("v_proj", "self_attn.qkv_proj", 2), ("gate_proj", "mlp.gate_up_proj", 0),
               ("up_proj", "mlp.gate_up_proj", 1))
_ALL_BIASED = frozenset(ATTN_LINEARS + MLP_LINEARS[1:])
# GPTBigCode's and GPT-2's blocks: LayerNorms ln_1/ln_2 with biases, c_attn split into q/k/v, an
# ungated tanh-GELU MLP c_fc/c_proj, every linear biased, learned positions instead of RoPE.
_GPT2_BLOCKS = dict(
    attn_norms=("ln_1",), mlp_norms=("ln_2",), attn_prefix="attn", mlp_linears=("up_proj", "down_proj"),
    linear_names=(("o_proj", "c_proj"), ("up_proj", "c_fc"), ("down_proj", "c_proj")),
    fused=(("q_proj", "attn.c_attn", 0), ("k_proj", "attn.c_attn", 1), ("v_proj", "attn.c_attn", 2)),
    norm="layer", norm_bias=True, eps_keys=("layer_norm_epsilon",), exllamav2_eps_key="layer_norm_epsilon",
    act="gelu_pytorch_tanh", act_names=("gelu_new", "gelu_pytorch_tanh"), rope_style="none", head_falls_back=True,
    always_biased=_ALL_BIASED)
_COHERE = dict(mlp_norms=(), parallel=True, norm="layer", head_norm="layer", eps_keys=("layer_norm_eps",),
               exllamav2_eps_key="layer_norm_eps", rope_style="gptj", head_falls_back=True)
_GEMMA = dict(act="gelu_pytorch_tanh", norm_offset=1.0, embed_scale=True, head_falls_back=True)
_GEMMA2 = dict(attn_norms=("input_layernorm", "post_attention_layernorm"),
               mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"), gemma=True, **_GEMMA)

# The vision-language models ExLlamaV2 0.3.2 converts: their language model is quantized, every
# tensor under ``extra_prefixes`` copied as it is (the prefixes are its vt_prefix and mmp_prefix).
# Qwen2-VL / Qwen2.5-VL: a Qwen2 language model at the top level ("model.layers", "lm_head") and
# the vision tower with its merger under "visual."; Llava (Pixtral) and Mistral 3: a Mistral
# language model under "language_model.", the tower and projector beside it (docs/format.md).
_QWEN2_VL = dict(always_biased=frozenset(QKV_LINEARS), text_config=True, mrope=True, calib_noise=(5, 30),
                 extra_prefixes=("visual.",))
_PIXTRAL = dict(prefix="language_model.", text_config=True, sliding_window=True, vision_model_type="pixtral",
                extra_prefixes=("vision_tower.", "multi_modal_projector."))
_VISION_LANGUAGE = {name: ArchSpec(name, **kw) for name, kw in (
    ("Qwen2VLForConditionalGeneration", _QWEN2_VL), ("Qwen2_5_VLForConditionalGeneration", _QWEN2_VL),
    ("LlavaForConditionalGeneration", _PIXTRAL), ("Mistral3ForConditionalGeneration", _PIXTRAL))}

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM"),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", sliding_window=True),
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM",
                                 always_biased=frozenset(QKV_LINEARS)),
    "Qwen3ForCausalLM": ArchSpec("Qwen3ForCausalLM", qk_norm=True),
    "Phi3ForCausalLM": ArchSpec("Phi3ForCausalLM", fused=_PHI3_FUSED),
    "GemmaForCausalLM": ArchSpec("GemmaForCausalLM", act_names=("gelu", "gelu_pytorch_tanh"), **_GEMMA),
    "YiForCausalLM": ArchSpec("YiForCausalLM", attn_norms=("ln1",), mlp_norms=("ln2",)),
    "OrionForCausalLM": ArchSpec("OrionForCausalLM", norm="layer", norm_bias=True),
    # Index's norm_head and the Granite and MiniCPM multipliers are config.json fields that
    # ModelConfig reads for every architecture, as ExLlamaV2 does.
    "IndexForCausalLM": ArchSpec("IndexForCausalLM"),
    "GraniteForCausalLM": ArchSpec("GraniteForCausalLM"),
    "MiniCPMForCausalLM": ArchSpec("MiniCPMForCausalLM", logit_scale_basedim=True),
    "InternLM2ForCausalLM": ArchSpec(
        "InternLM2ForCausalLM", embed="model.tok_embeddings", head="output", attn_norms=("attention_norm",),
        mlp_norms=("ffn_norm",), attn_prefix="attention", mlp_prefix="feed_forward", qkv_interleaved=True,
        linear_names=(("o_proj", "wo"), ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")),
        fused=(("q_proj", "attention.wqkv", 0), ("k_proj", "attention.wqkv", 1), ("v_proj", "attention.wqkv", 2)),
        keymap=(("$output.", "lm_head."), ("$model.tok_embeddings.", "model.embed_tokens."),
                (".attention.", ".self_attn."), (".wo.", ".o_proj."))),
    "GPTBigCodeForCausalLM": ArchSpec(
        "GPTBigCodeForCausalLM", layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
        positions="transformer.wpe", mqa=True, **_GPT2_BLOCKS,
        keymap=(("transformer.ln_f", "model.norm"), ("transformer.", "model."), (".attn.c_proj.", ".self_attn.o_proj."),
                (".attn.", ".self_attn."), (".h.", ".layers."), (".wte.", ".embed_tokens."))),
    "GPT2LMHeadModel": ArchSpec(
        "GPT2LMHeadModel", layers="h", embed="wte", final_norm="ln_f", positions="wpe", transposed=True,
        optional_prefix="transformer.", **_GPT2_BLOCKS,
        keymap=(("$transformer.", ""), ("$ln_f.", "model.norm."), (".attn.c_proj.", ".self_attn.o_proj."),
                (".attn.", ".self_attn."), ("$h.", "model.layers."), ("$wte.", "model.embed_tokens."),
                ("$wpe.", "model.wpe."))),
    "Starcoder2ForCausalLM": ArchSpec(
        "Starcoder2ForCausalLM", norm="layer", norm_bias=True, eps_keys=("norm_epsilon", "layer_norm_epsilon"),
        exllamav2_eps_key="layer_norm_epsilon", act="gelu_pytorch_tanh", mlp_linears=("up_proj", "down_proj"),
        linear_names=(("up_proj", "c_fc"), ("down_proj", "c_proj")), sliding_window=True, head_falls_back=True,
        always_biased=_ALL_BIASED),
    "Glm4ForCausalLM": ArchSpec(
        "Glm4ForCausalLM", attn_norms=("input_layernorm", "post_self_attn_layernorm"),
        mlp_norms=("post_attention_layernorm", "post_mlp_layernorm"), rope_style="gptj", bias_qkv_only=True,
        head_falls_back=True, fused=(("gate_proj", "mlp.gate_up_proj", 0), ("up_proj", "mlp.gate_up_proj", 1))),
    "Gemma2ForCausalLM": ArchSpec("Gemma2ForCausalLM", **_GEMMA2),
    "Gemma3ForCausalLM": ArchSpec("Gemma3ForCausalLM", qk_norm=True, out_arch="Gemma3ForConditionalGeneration",
                                  out_prefix="language_model.", **_GEMMA2),
    "Gemma3ForConditionalGeneration": ArchSpec(
        "Gemma3ForConditionalGeneration", prefix="language_model.", qk_norm=True, text_config=True,
        extra_prefixes=("vision_tower.", "multi_modal_projector."), **_GEMMA2),
    **_VISION_LANGUAGE,
    # Cohere's LayerNorm has no bias; its head is the embedding (ExLlamaV2's lm_head key for both).
    "CohereForCausalLM": ArchSpec("CohereForCausalLM", **_COHERE),
    "Cohere2ForCausalLM": ArchSpec("Cohere2ForCausalLM", sliding_window=True, rope_sliding_only=True, **_COHERE),
    "MixtralForCausalLM": ArchSpec("MixtralForCausalLM", sliding_window=True, moe=True,
                                   mlp_prefix="block_sparse_moe", mlp_linears=MOE_LINEARS),
    # Qwen3's attention; experts under "mlp" with a dense MLP's names (architecture.py, its
    # layer_keys_qwen3moe_mlp); every layer is MoE (ExLlamaV2 has no dense layers in it).
    "Qwen3MoeForCausalLM": ArchSpec(
        "Qwen3MoeForCausalLM", qk_norm=True, moe=True, mlp_linears=MOE_LINEARS,
        linear_names=(("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))),
    # Renamed to Mixtral's layout by ExLlamaV2's dbrx_keymap; up is "v1"; q/k/v fused in Wqkv;
    # LayerNorms without bias at torch's default epsilon (ExLlamaV2 reads none: its "norm_eps" None).
    "DbrxForCausalLM": ArchSpec(
        "DbrxForCausalLM", layers="transformer.blocks", embed="transformer.wte", final_norm="transformer.norm_f",
        attn_norms=("norm_attn_norm.norm_1",), mlp_norms=("norm_attn_norm.norm_2",), exllamav2_eps_key=None,
        attn_prefix="norm_attn_norm.attn", mlp_prefix="ffn", moe=True, moe_router="router.layer",
        moe_experts="experts.mlp", fused_experts=True, mlp_linears=MOE_LINEARS,
        linear_names=(("o_proj", "out_proj"), ("w3", "v1")), norm="layer", eps_keys=(), default_eps=1e-5,
        fused=(("q_proj", "norm_attn_norm.attn.Wqkv", 0), ("k_proj", "norm_attn_norm.attn.Wqkv", 1),
               ("v_proj", "norm_attn_norm.attn.Wqkv", 2)),
        keymap=(("transformer.", "model."), (".blocks.", ".layers."),
                (".ffn.experts.mlp.", ".block_sparse_moe.experts."), (".ffn.router.layer.", ".block_sparse_moe.gate."),
                (".norm_attn_norm.norm_1.", ".input_layernorm."),
                (".norm_attn_norm.norm_2.", ".post_attention_layernorm."), (".norm_attn_norm.attn.", ".self_attn."),
                (".out_proj.", ".o_proj."), (".norm_f.", ".norm."), (".wte.", ".embed_tokens."))),
    # Gemma with Mixtral's experts (remote code); ExLlamaV2 prints this caveat as it loads one.
    "GemmoeForCausalLM": ArchSpec(
        "GemmoeForCausalLM", act_names=("gelu", "gelu_pytorch_tanh"), moe=True, mlp_prefix="block_sparse_moe",
        mlp_linears=MOE_LINEARS, **_GEMMA,
        caveat="ExLlamaV2 0.3.2 marks its Gemmoe support as experimental and not fully tested"),
}


# (in_features, out_features) of each linear, from the config.
_SHAPES: dict[str, Callable[["ModelConfig"], tuple[int, int]]] = {
    "q_proj": lambda c: (c.hidden_size, c.num_heads * c.head_dim),
    "k_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
    "v_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
    "o_proj": lambda c: (c.num_heads * c.head_dim, c.hidden_size),
    "gate_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "up_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "down_proj": lambda c: (c.intermediate_size, c.hidden_size),
    # Mixtral's experts: intermediate_size is one expert's width
    "w1": lambda c: (c.hidden_size, c.intermediate_size),
    "w3": lambda c: (c.hidden_size, c.intermediate_size),
    "w2": lambda c: (c.intermediate_size, c.hidden_size),
}

# Which intermediate of the forward pass feeds each linear: the Hessian input (ExLlamaV2's
# conversion/measure.py, measure_quant, and conversion/quantize.py, quant: their add_batch calls).
HESSIAN_INPUT: dict[str, str] = {
    "q_proj": "post_norm",
    "k_proj": "post_norm",
    "v_proj": "post_norm",
    "o_proj": "attn_output",
    "gate_proj": "post_norm",
    "up_proj": "post_norm",
    "down_proj": "pre_down",
}

# MoE Hessian inputs (ExLlamaV2's conversion/measure.py, measure_quant and measure_moe_mlp): every
# w1 and w3 shares w1.0's, the post-norm of the rows in which expert 0 received a token; w2.j reads
# expert j's own pre_down.
MOE_SHARED_INPUT = "moe_post_norm"


def moe_hessian_input(short: str, expert: int) -> str:
    return f"pre_down.{expert}" if short == "w2" else MOE_SHARED_INPUT


@dataclass(frozen=True)
class LinearSpec:
    """One linear to quantize.

    ``name`` is its key (``model.layers.3.self_attn.q_proj``, or ``lm_head``; :func:`output_name`
    gives its name in the output); ``tensor`` the HF weight it is read from (differs for a tied
    head or a fused source, where ``rows`` = ((start, end), ...) are its output-row ranges inside
    ``tensor``, in order). K = ``in_features``,
    N = ``padded_out`` = ceil32(``out_features``). ``part`` is "attn", "mlp" or "head";
    ``hessian_input`` names the forward intermediate that feeds it. ``expert`` is the expert
    index of an MoE linear (``short`` is then "w1", "w3" or "w2", its measurement column)."""

    name: str
    short: str
    tensor: str
    in_features: int
    out_features: int
    padded_out: int
    bias: bool
    part: str
    hessian_input: str
    rows: tuple[tuple[int, int], ...] | None = None
    expert: int | None = None
    transposed: bool = False
    # DBRX's fused w2: the weight is rows [a, b) of ``tensor``, stored [in, out]; read, then transposed.
    in_rows: tuple[int, int] | None = None

    @property
    def bias_tensor(self) -> str | None:
        """The source bias: beside the weight, and of a fused source the same rows."""
        return self.tensor.removesuffix(".weight") + ".bias" if self.bias else None


def spec_of(cfg: "ModelConfig") -> ArchSpec:
    try:
        spec = ARCHS[cfg.arch]
    except KeyError:
        raise Exl2Error(
            f"architecture {cfg.arch!r} is not supported; supported: {', '.join(ARCHS)}"
        ) from None
    if getattr(cfg, "source_layout", "") == layouts.IN_MEMORY:
        spec = _in_memory(spec)
    prefix = getattr(cfg, "source_prefix", "")
    return _with_prefix(spec, prefix) if prefix else spec


@functools.lru_cache(maxsize=None)
def _with_prefix(spec: ArchSpec, prefix: str) -> ArchSpec:
    return dataclasses.replace(spec, prefix=prefix)


@functools.lru_cache(maxsize=None)
def _in_memory(spec: ArchSpec) -> ArchSpec:
    return dataclasses.replace(spec, **layouts.in_memory_fields(spec))


def output_name(cfg: "ModelConfig", name: str) -> str:
    """The name a source tensor (or module key) takes in the output and the measurement: the
    architecture's keymap applied (a module key is matched as if its tensors' "." followed it),
    then its output prefix."""
    spec = spec_of(cfg)
    return spec.out_prefix + apply_renames(name, spec.keymap)


def apply_renames(name: str, pairs) -> str:
    """``name`` with each (old, new) pair applied in order: ``old`` replaced wherever it occurs, or
    only at the start where it begins with "$"; a module's name is matched as if "." followed it
    (so ".mlp." finds a module ending in "mlp")."""
    name = name + "."
    for old, new in pairs:
        if old.startswith("$"):
            if name.startswith(old[1:]):
                name = new + name[len(old) - 1:]
        else:
            name = name.replace(old, new)
    return name[:-1]


def layer_prefix(cfg: "ModelConfig", i: int) -> str:
    spec = spec_of(cfg)
    return f"{spec.prefix}{spec.layers}.{i}"


def is_biased(cfg: "ModelConfig", short: str) -> bool:
    spec = spec_of(cfg)
    return (
        short in spec.always_biased
        or (cfg.attention_bias and short in (QKV_LINEARS if spec.bias_qkv_only else ATTN_LINEARS))
        or (cfg.mlp_bias and short in MLP_LINEARS)
    )


def _fused_rows(cfg: "ModelConfig", short: str, part: int) -> tuple[tuple[int, int], ...]:
    """Output-row ranges of part ``part`` of a fused tensor: q, k, v of qkv_proj are
    [0, H*d), [H*d, H*d + Hkv*d), [.., .. + Hkv*d); gate and up are the halves of gate_up_proj.
    InternLM2's wqkv (``ArchSpec.qkv_interleaved``) holds one block per key/value head: its G =
    heads / kv_heads query heads, then its key head, then its value head; q takes the first G*d
    rows of every block, k the next d, v the last d (ExLlamaV2's module.load_weight_fused)."""
    if short in MLP_INPUT_LINEARS:
        n = cfg.intermediate_size
        return ((part * n, (part + 1) * n),)
    d, kv = cfg.head_dim, cfg.num_kv_heads
    if spec_of(cfg).qkv_interleaved:
        group = cfg.num_heads // kv
        block = (group + 2) * d
        start, size = ((0, group * d), (group * d, d), ((group + 1) * d, d))[part]
        return tuple((h * block + start, h * block + start + size) for h in range(kv))
    q, kvd = cfg.num_heads * d, kv * d
    start = (0, q, q + kvd)[part]
    return ((start, start + (q if part == 0 else kvd)),)


def _linear(cfg: "ModelConfig", i: int, part: str, prefix: str, short: str) -> LinearSpec:
    k, n = _SHAPES[short](cfg)
    lp = layer_prefix(cfg, i)
    name = f"{lp}.{prefix}.{spec_of(cfg).linear_name(short)}"
    tensor, rows = f"{name}.weight", None
    for s, fused, idx in spec_of(cfg).fused:
        if s == short:
            tensor, rows = f"{lp}.{fused}.weight", _fused_rows(cfg, short, idx)
    return LinearSpec(
        name=name, short=short, tensor=tensor, in_features=k, out_features=n,
        padded_out=ceil32(n), bias=is_biased(cfg, short), part=part,
        hessian_input=HESSIAN_INPUT[short], rows=rows, transposed=spec_of(cfg).transposed,
    )


def _expert_linear(cfg: "ModelConfig", i: int, expert: int, short: str) -> LinearSpec:
    spec = spec_of(cfg)
    k, n = _SHAPES[short](cfg)
    experts = f"{layer_prefix(cfg, i)}.{spec.mlp_prefix}.{spec.moe_experts}"
    name = f"{experts}.{expert}.{spec.linear_name(short)}"
    tensor, rows, in_rows = f"{name}.weight", None, None
    if spec.fused_experts:
        tensor = f"{experts}.{spec.linear_name(short)}"
        block = (expert * cfg.intermediate_size, (expert + 1) * cfg.intermediate_size)
        rows, in_rows = ((block,), None) if short != "w2" else (None, block)
    return LinearSpec(
        name=name, short=short, tensor=tensor, in_features=k, out_features=n,
        padded_out=ceil32(n), bias=is_biased(cfg, short), part="mlp",
        hessian_input=moe_hessian_input(short, expert), expert=expert, rows=rows, in_rows=in_rows,
    )


def layer_linears(cfg: "ModelConfig", i: int, part: str | None = None) -> dict[str, LinearSpec]:
    """Linears of layer ``i`` keyed by short name, in ExLlamaV2's order (q, k, v, o, gate,
    up, down). ``part`` ("attn" or "mlp") keeps one group only. An MoE layer's experts are
    keyed "w1.<j>", "w3.<j>", "w2.<j>", expert by expert: the order in which ExLlamaV2
    quantizes and writes them (conversion/quantize.py, quant_moe_mlp; conversion/compile.py,
    compile_model)."""
    spec = spec_of(cfg)
    groups = (("attn", spec.attn_prefix, spec.attn_linears), ("mlp", spec.mlp_prefix, spec.mlp_linears))
    out: dict[str, LinearSpec] = {}
    for group, prefix, shorts in groups:
        if part is not None and part != group:
            continue
        if group == "mlp" and spec.moe:
            for j in range(cfg.num_experts):
                for short in shorts:
                    out[f"{short}.{j}"] = _expert_linear(cfg, i, j, short)
        else:
            for short in shorts:
                out[short] = _linear(cfg, i, group, prefix, short)
    if part is not None and not out:
        raise ValueError(f"part must be 'attn' or 'mlp', not {part!r}")
    return out


def head_spec(cfg: "ModelConfig", weights: "WeightIndex") -> LinearSpec:
    """The head, always keyed ``<prefix>lm_head``. It reads ``lm_head.weight`` when the
    checkpoint has one and otherwise, for tied configs, the embedding (ExLlamaV2's
    architecture.py, ExLlamaV2ArchParams.__init__, points the head's key at the embedding for
    tie_word_embeddings, and model.py, ExLlamaV2.__init__, makes that the head's alt_key). Its row
    count comes from the tensor itself, so N is that padded to 32."""
    spec = spec_of(cfg)
    name = f"{spec.prefix}{spec.head}"
    own = f"{name}.weight"
    if weights.has(own):
        tensor = own
    elif cfg.tie_word_embeddings or spec.head_falls_back:
        tensor = embedding_tensor(cfg)
    else:
        raise Exl2Error(
            f"{own} is missing from the safetensors files in {weights.model_dir} and config.json "
            f"does not set tie_word_embeddings; the head has no weights"
        )
    rows, k = weights.shape(tensor)
    return LinearSpec(
        name=name, short="lm_head", tensor=tensor, in_features=k, out_features=rows,
        padded_out=ceil32(rows), bias=False, part="head", hessian_input="final_norm",
    )


def norm_tensors(cfg: "ModelConfig", i: int, part: str) -> list[str]:
    """HF names of the norms of layer ``i``'s attention (part "attn") or MLP ("mlp"): the
    pre-norm first, then the branch post-norm where the architecture has one (Gemma2/3)."""
    spec = spec_of(cfg)
    p = layer_prefix(cfg, i)
    return [f"{p}.{n}.weight" for n in (spec.attn_norms if part == "attn" else spec.mlp_norms)]


def router_tensor(cfg: "ModelConfig", i: int) -> str | None:
    """The MoE router of layer ``i``, HF shape [num_experts, hidden], kept FP16 and unpadded
    (ExLlamaV2's moe_mlp.py, ExLlamaV2MoEMLP.__init__, makes it with ``pad32 = False``, and
    conversion/compile.py, get_f_module, copies it); None for a dense MLP."""
    spec = spec_of(cfg)
    if not spec.moe:
        return None
    return f"{layer_prefix(cfg, i)}.{spec.mlp_prefix}.{spec.moe_router}.weight"


def norm_weights(cfg: "ModelConfig", i: int, part: str) -> dict[str, str]:
    """Key in the module's weight dict -> HF tensor, for every norm tensor of layer ``i``'s
    ``part``: each norm's weight under its name inside the layer ("input_layernorm"), its bias under
    "<short>.bias" (LayerNorm with bias), and for attention the q/k head norms ("q_norm")."""
    names = norm_tensors(cfg, i, part) + (head_norm_tensors(cfg, i) if part == "attn" else [])
    out: dict[str, str] = {}
    p = layer_prefix(cfg, i)
    for name in names:
        # a norm by its name inside the layer (DBRX's "norm_attn_norm.norm_1"), a head norm by its own
        inside = name in norm_tensors(cfg, i, part)
        short = name[len(p) + 1:].removesuffix(".weight") if inside else name.split(".")[-2]
        out[short] = name
        bias = norm_bias_tensor(cfg, name)
        if bias and name not in head_norm_tensors(cfg, i):
            out[f"{short}.bias"] = bias
    return out


def norm_bias_tensor(cfg: "ModelConfig", weight_name: str) -> str | None:
    """The bias of the norm whose weight is ``weight_name``, or None where the architecture's
    norms have none."""
    return weight_name.removesuffix(".weight") + ".bias" if spec_of(cfg).norm_bias else None


def head_norm_tensors(cfg: "ModelConfig", i: int) -> list[str]:
    """The q/k head norms of layer ``i``: Qwen3's and Gemma3's, each HF shape [head_dim]; a Cohere
    with use_qk_norm's, [heads, head_dim] and [kv_heads, head_dim]; else []."""
    if not (spec_of(cfg).qk_norm or cfg.use_qk_norm):
        return []
    p = f"{layer_prefix(cfg, i)}.{spec_of(cfg).attn_prefix}"
    return [f"{p}.q_norm.weight", f"{p}.k_norm.weight"]


def unquantized_tensors(cfg: "ModelConfig", i: int) -> list[str]:
    """HF names of the norms of layer ``i`` that read the residual stream: the attention's
    pre-norm, then the MLP's (a parallel layer has the first only). Every FP16 tensor of a layer
    is in :func:`norm_tensors` and :func:`head_norm_tensors`."""
    return [norm_tensors(cfg, i, part)[0] for part in ("attn", "mlp") if norm_tensors(cfg, i, part)]


def embedding_tensor(cfg: "ModelConfig") -> str:
    spec = spec_of(cfg)
    return f"{spec.prefix}{spec.embed}.weight"


def position_tensor(cfg: "ModelConfig") -> str | None:
    """The learned position table (GPTBigCode's wpe), or None where positions come from RoPE."""
    spec = spec_of(cfg)
    return f"{spec.prefix}{spec.positions}.weight" if spec.positions else None


def final_norm_tensor(cfg: "ModelConfig") -> str:
    spec = spec_of(cfg)
    return f"{spec.prefix}{spec.final_norm}.weight"


def extra_tensors(cfg: "ModelConfig", weights: "WeightIndex") -> list[str]:
    """Source tensors outside the language model (Gemma3's vision tower and projector), in
    file order; copied verbatim in their source dtype after the head (ExLlamaV2's
    conversion/compile.py, compile_model, its extra_tensors)."""
    prefixes = spec_of(cfg).extra_prefixes
    return [n for n in weights.entries if prefixes and n.startswith(prefixes)]


def expected_tensors(cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
    """Every HF tensor the conversion reads, with its shape, in module order. The head is
    listed only where it has no fallback (untied, and not an architecture whose head falls back
    to the embedding). A fused source is listed
    once, with its full row count."""
    spec = spec_of(cfg)
    h = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {embedding_tensor(cfg): (cfg.vocab_size, h)}
    if position_tensor(cfg):
        out[position_tensor(cfg)] = (cfg.max_position_embeddings, h)
    for i in range(cfg.num_layers):
        for part in ("attn", "mlp"):
            for norm in norm_tensors(cfg, i, part):
                out[norm] = (h,)
                if norm_bias_tensor(cfg, norm):
                    out[norm_bias_tensor(cfg, norm)] = (h,)
            for lin in layer_linears(cfg, i, part).values():
                if lin.in_rows:  # DBRX's fused w2, [E * I, H]
                    out[lin.tensor] = (max(lin.in_rows[1], out.get(lin.tensor, (0,))[0]), lin.out_features)
                    continue
                end = max(b for _, b in lin.rows) if lin.rows else lin.out_features
                rows = max(end, out.get(lin.tensor, (0, 0))[1 if lin.transposed else 0])
                out[lin.tensor] = (lin.in_features, rows) if lin.transposed else (rows, lin.in_features)
                if lin.bias:
                    out[lin.bias_tensor] = (rows,)
            if part == "attn" and head_norm_tensors(cfg, i):
                q_norm, k_norm = head_norm_tensors(cfg, i)
                per_head = cfg.use_qk_norm
                out[q_norm] = (cfg.num_heads, cfg.head_dim) if per_head else (cfg.head_dim,)
                out[k_norm] = (cfg.num_kv_heads, cfg.head_dim) if per_head else (cfg.head_dim,)
            elif router_tensor(cfg, i):
                out[router_tensor(cfg, i)] = (cfg.num_experts, h)
    out[final_norm_tensor(cfg)] = (h,)
    if norm_bias_tensor(cfg, final_norm_tensor(cfg)):
        out[norm_bias_tensor(cfg, final_norm_tensor(cfg))] = (h,)
    if not cfg.tie_word_embeddings and not spec.head_falls_back:
        out[f"{spec.prefix}{spec.head}.weight"] = (cfg.vocab_size, h)
    return out
