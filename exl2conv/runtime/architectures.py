"""Which transformers class runs each architecture exl2conv writes, and how the EXL2 tensor names
map onto that class's module tree: the runtime's one table (:data:`RUNTIME`).

An EXL2 folder names its tensors as ExLlamaV2 0.3.2 reads them (exl2conv.model.arch: each
architecture's keymap and output prefix applied, fused sources split into q/k/v and gate/up, MoE
experts one linear each). transformers 5 names them as its class holds them. Each entry's
``rename`` takes the first to the second; a name renamed to ``<module>#<i>`` is part ``i`` of a
fused linear of the class (Phi-3's qkv_proj, GPT-2's c_attn, DBRX's Wqkv), run as the parts'
outputs concatenated (:class:`exl2conv.runtime.modules.FusedExl2Linear`). An entry with
``experts`` has MoE layers: the class's experts module (3D parameters in transformers 5) is
replaced by :class:`exl2conv.runtime.modules.Exl2Experts`, one Exl2Linear per expert linear, as
the file stores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from exl2conv.errors import Exl2Error
from exl2conv.model.arch import ARCHS, apply_renames
from exl2conv.model.config import ModelConfig


@dataclass(frozen=True)
class RuntimeArch:
    """How one architecture's EXL2 folder becomes a transformers model.

    ``cls``: the transformers class built. ``text_config``: built from config.json's text_config
    (the language model alone). ``rename``: (old, new) pairs applied in order to every EXL2 name
    (a module's name is matched as if "." followed it, as exl2conv.model.arch.output_name does):
    ``old`` replaced wherever it occurs, or only at the start where it begins with "$".
    ``experts``: the EXL2 short names of each expert's gate, up and down linears; ``experts_act``
    the attribute path of the activation inside the class's experts module. ``no_vision``: the
    entry used instead when config.json has no vision_config (a Gemma3ForCausalLM, converted to
    Gemma3ForConditionalGeneration's layout with no vision tower: exl2conv.model.arch).

    A family with no transformers class of its own (remote code on the hub) runs as a class that
    computes the same model: ``config`` builds that class's config (its name and arguments) from
    exl2conv's reading of config.json (:class:`exl2conv.model.config.ModelConfig`, which reads it
    as ExLlamaV2 0.3.2 does), and ``plain``, where the class computes a step differently, takes
    each unquantized tensor (its EXL2 name, the tensor, the config) to what the class expects."""

    cls: str
    text_config: bool = False
    rename: tuple[tuple[str, str], ...] = ()
    experts: tuple[str, str, str] | None = None
    experts_act: str = "act_fn"
    no_vision: "RuntimeArch | None" = None
    config: Callable[[ModelConfig], tuple[str, dict]] | None = None
    plain: Callable[[str, torch.Tensor, ModelConfig], torch.Tensor] | None = None


def _fused(old: str, new: str, parts: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Rename pairs sending ``<old><part>`` linears to parts 0, 1, ... of the fused ``new``."""
    return tuple((f".{old}{p}.", f".{new}#{i}.") for i, p in enumerate(parts))


_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")
# GPT-2 and GPTBigCode: the EXL2 files hold ExLlamaV2's Llama-like names (arch.py's keymaps)
_GPT2 = RuntimeArch("GPT2LMHeadModel", rename=(
    ("$model.layers.", "transformer.h."), ("$model.embed_tokens.", "transformer.wte."),
    ("$model.wpe.", "transformer.wpe."), ("$model.norm.", "transformer.ln_f."),
    *_fused("self_attn.", "attn.c_attn", _QKV), (".self_attn.o_proj.", ".attn.c_proj.")))
# Llava, Mistral 3 and Gemma 3: the hub's layout in the files, transformers 5's in memory
_LANGUAGE_MODEL_VL = (("$language_model.model.", "model.language_model."), ("$language_model.lm_head.", "lm_head."),
                      ("$vision_tower.", "model.vision_tower."),
                      ("$multi_modal_projector.", "model.multi_modal_projector."))
_QWEN2_VL = (("$model.", "model.language_model."), ("$visual.", "model.visual."))



# -- the remote-code families, as transformers classes that compute them ----------------------------

def _decoder_config(cfg: ModelConfig) -> dict:
    """The arguments every decoder config of transformers takes, from exl2conv's reading."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                rope_scaling=cfg.rope_scaling, hidden_act=ARCHS[cfg.arch].act, bos_token_id=cfg.bos_token_id,
                eos_token_id=list(cfg.eos_token_ids) or None, tie_word_embeddings=False)


def _llama_config(cfg: ModelConfig) -> tuple[str, dict]:
    """Yi, Index and InternLM2 are Llama's arithmetic under other names (Index's norm_head is
    applied to the head before it is quantized: exl2conv.model.forward.load_head)."""
    return "LlamaConfig", _decoder_config(cfg) | dict(rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attention_bias,
                                                      mlp_bias=cfg.mlp_bias)


def _stablelm_config(cfg: ModelConfig) -> tuple[str, dict]:
    """Orion is Llama with LayerNorms (weight and bias) in place of RMSNorms: StableLM's
    arithmetic with full rotary, no q/k norms and sequential residuals. StableLM derives its
    head size from hidden_size / heads; a model whose head_dim differs is refused."""
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise Exl2Error(f"architecture {cfg.arch}: head_dim {cfg.head_dim} x {cfg.num_heads} heads is not "
                        f"hidden_size {cfg.hidden_size}; the EXL2 runtime runs {cfg.arch} only where it is")
    return "StableLmConfig", _decoder_config(cfg) | dict(
        layer_norm_eps=cfg.norm_eps, use_qkv_bias=cfg.attention_bias, partial_rotary_factor=cfg.partial_rotary_factor,
        qk_layernorm=False, use_parallel_residual=False)


def _granite_config(cfg: ModelConfig) -> tuple[str, dict]:
    """MiniCPM is Granite's arithmetic: embeddings times scale_emb, each block's output times
    scale_depth / sqrt(layers) before the residual, logits divided by hidden / dim_model_base
    (ModelConfig's embedding_multiplier, residual_scale and logit_scale)."""
    return "GraniteConfig", _llama_config(cfg)[1] | dict(
        embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_scale,
        logits_scaling=1.0 / cfg.logit_scale, attention_multiplier=cfg.attn_scale or cfg.head_dim ** -0.5)


def _mixtral_config(cfg: ModelConfig) -> tuple[str, dict]:
    """Gemmoe's layers are Mixtral's with Gemma's norms, embeddings and GELU (:func:`_gemma_tensor`)."""
    return "MixtralConfig", _decoder_config(cfg) | dict(
        rms_norm_eps=cfg.norm_eps, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        sliding_window=None)


def _gemma_tensor(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Gemma's steps folded into a Llama-style class's tensors: an RMSNorm multiplies by 1 + w
    (the files hold w), and the embeddings are scaled by sqrt(hidden) in their own dtype, as
    Gemma scales the rows it looks up (the head is its own quantized linear, so the table may
    carry the factor)."""
    if name.endswith("norm.weight"):
        return t + cfg.norm_offset
    if name == "model.embed_tokens.weight":
        return t * torch.tensor(math.sqrt(cfg.hidden_size), dtype=t.dtype)
    return t


RUNTIME: dict[str, RuntimeArch] = {
    # the tensors keep the class's own names
    **{name: RuntimeArch(name) for name in (
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
        "Gemma2ForCausalLM", "GraniteForCausalLM", "Starcoder2ForCausalLM", "CohereForCausalLM",
        "Cohere2ForCausalLM")},
    "Phi3ForCausalLM": RuntimeArch("Phi3ForCausalLM", rename=_fused("self_attn.", "self_attn.qkv_proj", _QKV)
                                   + _fused("mlp.", "mlp.gate_up_proj", _GATE_UP)),
    "Glm4ForCausalLM": RuntimeArch("Glm4ForCausalLM", rename=_fused("mlp.", "mlp.gate_up_proj", _GATE_UP)),
    "GPT2LMHeadModel": _GPT2,
    "GPTBigCodeForCausalLM": RuntimeArch("GPTBigCodeForCausalLM", rename=_GPT2.rename),
    "Gemma3ForConditionalGeneration": RuntimeArch(
        "Gemma3ForConditionalGeneration", rename=_LANGUAGE_MODEL_VL,
        no_vision=RuntimeArch("Gemma3ForCausalLM", text_config=True, rename=(("$language_model.", ""),))),
    "LlavaForConditionalGeneration": RuntimeArch("LlavaForConditionalGeneration", rename=_LANGUAGE_MODEL_VL),
    "Mistral3ForConditionalGeneration": RuntimeArch("Mistral3ForConditionalGeneration", rename=_LANGUAGE_MODEL_VL),
    "Qwen2VLForConditionalGeneration": RuntimeArch("Qwen2VLForConditionalGeneration", rename=_QWEN2_VL),
    "Qwen2_5_VLForConditionalGeneration": RuntimeArch("Qwen2_5_VLForConditionalGeneration", rename=_QWEN2_VL),
    "MixtralForCausalLM": RuntimeArch("MixtralForCausalLM", rename=((".block_sparse_moe.", ".mlp."),),
                                      experts=("w1", "w3", "w2")),
    "Qwen3MoeForCausalLM": RuntimeArch("Qwen3MoeForCausalLM", experts=("gate_proj", "up_proj", "down_proj")),
    # ExLlamaV2's dbrx_keymap gave the files Mixtral's names (up is still "v1"); back to DBRX's
    "DbrxForCausalLM": RuntimeArch("DbrxForCausalLM", experts=("w1", "v1", "w2"), experts_act="mlp.activation_fn",
                                   rename=(
        ("$model.layers.", "transformer.blocks."), ("$model.embed_tokens.", "transformer.wte."),
        ("$model.norm.", "transformer.norm_f."), (".input_layernorm.", ".norm_attn_norm.norm_1."),
        (".post_attention_layernorm.", ".norm_attn_norm.norm_2."),
        *_fused("self_attn.", "norm_attn_norm.attn.Wqkv", _QKV),
        (".self_attn.o_proj.", ".norm_attn_norm.attn.out_proj."), (".block_sparse_moe.gate.", ".ffn.router.layer."),
        (".block_sparse_moe.experts.", ".ffn.experts."))),
    # Remote-code families (no transformers class of their own), each as a class that computes it
    "YiForCausalLM": RuntimeArch("LlamaForCausalLM", config=_llama_config, rename=(
        (".ln1.", ".input_layernorm."), (".ln2.", ".post_attention_layernorm."))),
    "IndexForCausalLM": RuntimeArch("LlamaForCausalLM", config=_llama_config),
    "InternLM2ForCausalLM": RuntimeArch("LlamaForCausalLM", config=_llama_config, rename=(
        (".attention_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
        (".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w3.", ".mlp.up_proj."),
        (".feed_forward.w2.", ".mlp.down_proj."))),
    "OrionForCausalLM": RuntimeArch("StableLmForCausalLM", config=_stablelm_config),
    "MiniCPMForCausalLM": RuntimeArch("GraniteForCausalLM", config=_granite_config),
    "GemmoeForCausalLM": RuntimeArch("MixtralForCausalLM", config=_mixtral_config, plain=_gemma_tensor,
                                     rename=((".block_sparse_moe.", ".mlp."),), experts=("w1", "w3", "w2")),
}


def runtime_arch(arch: str, raw_config: dict) -> RuntimeArch:
    """The entry of ``arch`` (config.json's architectures[0], ``raw_config`` its contents), or an
    Exl2Error of one line naming what the runtime supports."""
    entry = RUNTIME.get(arch)
    if entry is None:
        raise Exl2Error(f"architecture {arch}: the EXL2 runtime cannot load it; supported: {', '.join(RUNTIME)}")
    if entry.no_vision is not None and "vision_config" not in raw_config:
        return entry.no_vision
    return entry


def class_name(entry: RuntimeArch, name: str) -> str:
    """The class's name of EXL2 tensor or module ``name`` (``<module>#<i>``: a fused linear's part)."""
    return apply_renames(name, entry.rename)
