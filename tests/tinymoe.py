"""Tiny random mixture-of-experts models beyond Mixtral, each in the layout its hub checkpoints
have (the one ExLlamaV2 0.3.2 reads), and the float32 transformers model each is checked against.

- Qwen3MoeForCausalLM: built and saved by transformers (which writes per-expert
  ``mlp.experts.<j>.gate_proj`` etc., as the hub does); config.json then in the hub's form
  (``num_experts``, top-level ``rope_theta``).
- DbrxForCausalLM: built and saved by transformers (``ffn.experts.mlp.w1/v1/w2`` fused [E*I, H],
  ``norm_attn_norm.attn.Wqkv``, as the hub); config.json with the hub's nested fields only.
- GemmoeForCausalLM (remote code): a Gemma with Mixtral's ``block_sparse_moe`` experts, written
  under the names ExLlamaV2 reads; its reference is a MixtralForCausalLM given Gemma's embedding
  scale, norm offset, tanh GELU and tied head (:func:`gemmoe_twin`).

All: hidden 64, 4 heads of 16, 2 key/value heads, the byte-level tokenizer (258 tokens).
``width`` is an expert's width: 96 by default, 128 for ExLlamaV2's fused kernel (GPU tests).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.tinymodel import BYTE_TOKENS, write_tokenizer

MOE_ARCHS = ("Qwen3MoeForCausalLM", "DbrxForCausalLM", "GemmoeForCausalLM")
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              bos_token_id=BYTE_TOKENS, eos_token_id=BYTE_TOKENS + 1)
# DBRX clamps q, k and v to +-clip_qkv: low enough here that it bites on the tiny model's activations
DBRX_CLIP = 0.8


def _randomize(model, seed: int, norm_mean: float) -> None:
    """Embeddings ~ N(0, 1); linears, fused expert stacks and the router ~ N(0, 1/fan_in) (routing
    far from uniform); norms ~ norm_mean + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "embed_tokens" in name or ".wte." in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(norm_mean + 0.1 * torch.randn(p.shape, generator=g))


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def make_tiny_moe(path, arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float16, width: int = 96,
                  experts: int = 4, per_token: int = 2, extra_config: dict | None = None) -> Path:
    """A tiny random ``arch`` (one of :data:`MOE_ARCHS`) at ``path``; ``extra_config`` goes into
    config.json (DBRX: into ffn_config / attn_config where it names their fields)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path)
    extra = dict(extra_config or {})
    torch.manual_seed(seed)
    if arch == "Qwen3MoeForCausalLM":
        config = tf.Qwen3MoeConfig(**COMMON, vocab_size=vocab, head_dim=16, intermediate_size=128,
                                   moe_intermediate_size=width, num_experts=experts, num_experts_per_tok=per_token,
                                   norm_topk_prob=extra.pop("norm_topk_prob", True), rms_norm_eps=1e-6)
        model = tf.Qwen3MoeForCausalLM(config)
    elif arch == "DbrxForCausalLM":
        attn = {"kv_n_heads": 2, "clip_qkv": extra.pop("clip_qkv", DBRX_CLIP), "rope_theta": 10000.0}
        ffn = {"ffn_hidden_size": width, "moe_num_experts": experts, "moe_top_k": per_token}
        config = tf.DbrxConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=vocab,
                               attn_config=attn, ffn_config=ffn)
        model = tf.DbrxForCausalLM(config)
    elif arch == "GemmoeForCausalLM":
        config = tf.MixtralConfig(**COMMON, vocab_size=vocab, head_dim=16, intermediate_size=width,
                                  num_local_experts=experts, num_experts_per_tok=per_token, rms_norm_eps=1e-6,
                                  hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
        model = tf.MixtralForCausalLM(config)
    else:
        raise ValueError(f"no tiny MoE builder for {arch}")
    # Gemma stores its norms as w - 1
    _randomize(model, seed, 0.0 if arch == "GemmoeForCausalLM" else 1.0)
    model.to(dtype).save_pretrained(path)
    _edit_config(path, lambda cfg: _hub_config(cfg, arch, extra))
    return path


def _hub_config(cfg: dict, arch: str, extra: dict) -> None:
    """transformers 5's saved config.json -> the form of the hub's configs of ``arch``."""
    rope = (cfg.pop("rope_parameters", None) or {}).get("rope_theta", 10000.0)
    if arch == "Qwen3MoeForCausalLM":
        cfg["num_experts"] = cfg.pop("num_local_experts")  # the hub's name (transformers 5 renames it)
        cfg["rope_theta"] = rope
    if arch == "DbrxForCausalLM":
        cfg.pop("num_key_value_heads", None)  # transformers 5 adds it; the hub's configs nest it only
        keep = {"attn_config": ("kv_n_heads", "clip_qkv", "rope_theta"),
                "ffn_config": ("ffn_hidden_size", "moe_num_experts", "moe_top_k", "moe_normalize_expert_weights")}
        for part, keys in keep.items():
            cfg[part] = {k: cfg[part][k] for k in keys if k in cfg[part]}
            cfg[part].update({k: extra.pop(k) for k in list(extra) if k in keys})
    if arch == "GemmoeForCausalLM":
        cfg["architectures"], cfg["model_type"] = ["GemmoeForCausalLM"], "gemmoe"
        cfg["hidden_act"] = "gelu"  # Gemma 1's configs name the tanh GELU so
        cfg["rope_theta"] = rope
    cfg.update(extra)


def reference_model(path, arch: str):
    """The float32 transformers model that computes what the tiny ``arch`` at ``path`` does, and
    a function ids -> logits that runs it."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    if arch == "GemmoeForCausalLM":
        model = gemmoe_twin(path)
        scale = math.sqrt(model.config.hidden_size)

        def run(ids):
            with torch.no_grad():
                return model(inputs_embeds=model.model.embed_tokens(ids) * scale).logits
        return model, run
    model = getattr(tf, arch).from_pretrained(str(path), dtype=torch.float32).eval()

    def run(ids):
        with torch.no_grad():
            return model(ids).logits
    return model, run


def gemmoe_twin(path):
    """A float32 MixtralForCausalLM computing the tiny Gemmoe at ``path``: its norms' weights
    plus 1 (Gemma's RMSNorm multiplies by 1 + w), the tanh GELU, the head tied to the embedding;
    the caller scales the embeddings by sqrt(hidden) (:func:`reference_model`)."""
    import transformers as tf

    raw = json.loads((Path(path) / "config.json").read_text())
    drop = ("architectures", "model_type", "hidden_act", "transformers_version")
    keep = {k: v for k, v in raw.items() if k not in drop}
    config = tf.MixtralConfig(**(keep | {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True}))
    tensors = {k: v.float() + (1.0 if k.endswith("norm.weight") else 0.0)
               for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    with tempfile.TemporaryDirectory() as saved:  # loaded as transformers loads Mixtral's checkpoints
        tf.MixtralForCausalLM(config).save_pretrained(saved)
        save_file(tensors, str(Path(saved) / "model.safetensors"), metadata={"format": "pt"})
        return tf.MixtralForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
