"""config.json fields of the mixture-of-experts architectures, and the configs refused because
ExLlamaV2 0.3.2 would run their EXL2 output as another model.

ExLlamaV2's config.py reads the experts per layer from ``num_local_experts``, DBRX's
``ffn_config.moe_num_experts`` or ``num_experts`` (Qwen3-MoE's hub configs), the experts per token
from ``num_experts_per_tok`` or ``ffn_config.moe_top_k``, and for any MoE architecture an expert's
width from ``moe_intermediate_size`` where the config has it. Its MoE block (moe_mlp.py,
ExLlamaV2MoEMLP) makes every layer sparse and always renormalizes the top-k routing weights to
sum 1; the forward here follows the model's config, and :func:`caveats` says where they differ.

DBRX's configs nest most fields (``attn_config``, ``ffn_config``) and use the MPT names (d_model,
n_heads, ...): :func:`flat_dbrx` gives them the names the rest of the reader uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import Exl2Error
from .arch import layer_prefix, spec_of

if TYPE_CHECKING:  # config imports this module
    from .config import ModelConfig

# The top-level names of DBRX's fields: (flat name, where ExLlamaV2's config.py reads it).
_DBRX_FIELDS = (
    ("hidden_size", ("d_model",)), ("num_attention_heads", ("n_heads",)), ("num_hidden_layers", ("n_layers",)),
    ("max_position_embeddings", ("max_seq_len",)), ("num_key_value_heads", ("attn_config", "kv_n_heads")),
    ("rope_theta", ("attn_config", "rope_theta")), ("intermediate_size", ("ffn_config", "ffn_hidden_size")),
    ("num_local_experts", ("ffn_config", "moe_num_experts")), ("num_experts_per_tok", ("ffn_config", "moe_top_k")),
)


def _nested(raw: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        raw = raw.get(key) if isinstance(raw, dict) else None
    return raw


def flat_dbrx(raw: dict) -> dict:
    """A DBRX config.json with its nested and MPT-named fields also under the usual top-level names
    (an explicit top-level value wins, as ExLlamaV2 reads those first); ``clip_qkv`` and the FFN's
    activation and weight normalization come up too, under ``dbrx_*`` names."""
    out = dict(raw)
    for flat, path in _DBRX_FIELDS:
        if out.get(flat) is None and _nested(raw, path) is not None:
            out[flat] = _nested(raw, path)
    out["dbrx_clip_qkv"] = _nested(raw, ("attn_config", "clip_qkv"))
    act = _nested(raw, ("ffn_config", "ffn_act_fn"))
    out["hidden_act"] = act.get("name", "silu") if isinstance(act, dict) else "silu"
    ffn = raw.get("ffn_config") if isinstance(raw.get("ffn_config"), dict) else {}
    # transformers' DbrxFFNConfig default: 1, the top-k weights divided by their sum
    out["dbrx_normalize"] = ffn.get("moe_normalize_expert_weights", 1) if ffn else 1
    return out


def moe_fields(r, arch: str, num_layers: int) -> dict:
    """ModelConfig's MoE fields (experts, experts per token, whether the routing weights are
    renormalized, DBRX's clip_qkv) from the reader ``r`` (config._Reader); Exl2Error for a config
    ExLlamaV2 0.3.2 cannot run the same."""
    key = next((k for k in ("num_local_experts", "num_experts") if r.raw.get(k) is not None), "num_local_experts")
    experts = r.int(key)
    per_tok = r.int("num_experts_per_tok")
    if per_tok > experts:
        raise r.fail(f"num_experts_per_tok ({per_tok}) exceeds {key} ({experts})")
    renorm, clip = True, None
    if arch == "Qwen3MoeForCausalLM":
        _check_all_layers_sparse(r, num_layers)
        renorm = r.bool("norm_topk_prob", False)  # transformers' Qwen3MoeConfig default
    if arch == "DbrxForCausalLM":
        norm = r.raw["dbrx_normalize"]
        if norm not in (None, 1, 1.0):
            raise r.fail(f"ffn_config.moe_normalize_expert_weights is {norm!r}: the model divides its routing "
                         f"weights by their {norm}-norm, ExLlamaV2 0.3.2 by their sum; its EXL2 output would run "
                         "wrongly, so the model is not converted")
        renorm = norm is not None
        clip = r.raw["dbrx_clip_qkv"]
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise r.fail(f"attn_config.clip_qkv must be a positive number or null, not {clip!r}")
        clip = None if clip is None else float(clip)
        if r.raw.get("intermediate_size") == r.raw.get("hidden_size"):
            raise r.fail("ffn_config.ffn_hidden_size equals d_model: ExLlamaV2 0.3.2 tells a fused w2 slice's "
                         "orientation by its shape (module.py, load_weight_fused) and would load it untransposed; "
                         "the model is not converted")
    return dict(num_experts=experts, num_experts_per_tok=per_tok, moe_renormalize=renorm, clip_qkv=clip)


def _check_all_layers_sparse(r, num_layers: int) -> None:
    """Qwen3-MoE can keep some layers dense (mlp_only_layers, decoder_sparse_step); ExLlamaV2 0.3.2
    makes every layer an MoE block and would look for experts that are not there."""
    dense = r.raw.get("mlp_only_layers") or []
    step = r.raw.get("decoder_sparse_step", 1)
    if dense or step != 1:
        raise r.fail(f"mlp_only_layers {dense} / decoder_sparse_step {step} make some of the {num_layers} layers "
                     "dense, and ExLlamaV2 0.3.2 runs every Qwen3MoeForCausalLM layer as a mixture of experts; "
                     "the model is not converted")


def caveats(cfg: "ModelConfig") -> list[str]:
    """Warning lines for a conversion of ``cfg``: ExLlamaV2's own caveat for the architecture,
    and where its EXL2 output will run otherwise than the model (and than the calibration here)."""
    spec = spec_of(cfg)
    out = [spec.caveat] if spec.caveat else []
    if spec.moe and not cfg.moe_renormalize:
        out.append(f"{cfg.arch}: the config leaves the top-{cfg.num_experts_per_tok} routing weights "
                   "unnormalized and the calibration follows it, but ExLlamaV2 0.3.2 always renormalizes them "
                   "to sum 1 (moe_mlp.py), so the EXL2 model will run differently from the original")
    if cfg.clip_qkv is not None:
        out.append(f"{cfg.arch}: the model clamps q, k and v to +-{cfg.clip_qkv:g} (clip_qkv) and the "
                   "calibration does too, but ExLlamaV2 0.3.2 ignores clip_qkv, so the EXL2 model does not clamp")
    return out


def check_expert_layout(cfg: "ModelConfig", names) -> None:
    """Refuse a checkpoint whose experts are stacked in transformers 5's in-memory form, one 3-D
    ``mlp.experts.gate_up_proj`` / ``down_proj`` per layer (Mixtral's too are under "mlp" there), where
    ExLlamaV2 0.3.2 reads one tensor per expert (the hub's layout, which transformers' save_pretrained
    writes back); ``names``: the checkpoint's tensor names."""
    spec = spec_of(cfg)
    if not spec.moe or spec.fused_experts:
        return
    for block in dict.fromkeys((spec.mlp_prefix, "mlp")):
        stacked = f"{layer_prefix(cfg, 0)}.{block}.{spec.moe_experts}.gate_up_proj"
        if stacked in names or f"{stacked}.weight" in names:
            raise Exl2Error(f"{cfg.model_dir}: the experts are stored stacked ({stacked}), a layout ExLlamaV2 "
                            "0.3.2 cannot read; save the model with transformers' save_pretrained, which writes one "
                            "tensor per expert as the hub's checkpoints have them, and convert that")
