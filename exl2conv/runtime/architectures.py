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

from dataclasses import dataclass

from exl2conv.errors import Exl2Error
from exl2conv.model.arch import apply_renames


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
    Gemma3ForConditionalGeneration's layout with no vision tower: exl2conv.model.arch)."""

    cls: str
    text_config: bool = False
    rename: tuple[tuple[str, str], ...] = ()
    experts: tuple[str, str, str] | None = None
    experts_act: str = "act_fn"
    no_vision: "RuntimeArch | None" = None


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
}

# Architectures exl2conv converts that transformers 5 has no class for (remote code on the hub)
NO_CLASS = ("YiForCausalLM", "OrionForCausalLM", "IndexForCausalLM", "MiniCPMForCausalLM", "InternLM2ForCausalLM",
            "GemmoeForCausalLM")


def runtime_arch(arch: str, raw_config: dict) -> RuntimeArch:
    """The entry of ``arch`` (config.json's architectures[0], ``raw_config`` its contents), or an
    Exl2Error of one line naming what the runtime supports."""
    entry = RUNTIME.get(arch)
    if entry is None:
        why = "it has no transformers class (remote code)" if arch in NO_CLASS else "it is not supported"
        raise Exl2Error(f"architecture {arch}: the EXL2 runtime cannot load it, {why}; "
                        f"supported: {', '.join(RUNTIME)}")
    if entry.no_vision is not None and "vision_config" not in raw_config:
        return entry.no_vision
    return entry


def class_name(entry: RuntimeArch, name: str) -> str:
    """The class's name of EXL2 tensor or module ``name`` (``<module>#<i>``: a fused linear's part)."""
    return apply_renames(name, entry.rename)
