"""A tiny random Llama/Mistral model folder for tests: config.json, safetensors weights (one file
or shards with an index), and a byte-level BPE tokenizer. Deterministic for a seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tinyvl import VISION_PARTS, VL_ARCHS, vl_config, write_processor_files

BOS, EOS = "<s>", "</s>"
BYTE_TOKENS = 256
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes map to themselves, the
    rest to code points from 256 upwards, in byte order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)}
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def write_tokenizer(path: Path) -> int:
    """tokenizer.json (256 byte tokens, then <s>=256 and </s>=257, no merges) and
    tokenizer_config.json. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 2048,
    }, indent=2))
    return tok.get_vocab_size()


def _weights(cfg: dict, seed: int, dtype: torch.dtype, mlp_bias: bool) -> dict[str, torch.Tensor]:
    """Linears ~ N(0, 1/fan_in) so attention scores are O(1) (softmax far from uniform, so RoPE
    and masking errors show); norms ~ 1 + N(0, 0.1); biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, vocab = cfg.get("head_dim") or h // heads, cfg["vocab_size"]

    def lin(out: int, fan_in: int) -> torch.Tensor:
        return torch.randn(out, fan_in, generator=g) / math.sqrt(fan_in)

    def vec(n: int, mean: float = 0.0) -> torch.Tensor:
        return mean + 0.1 * torch.randn(n, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g)}
    shapes = {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
              "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = vec(h, 1.0)
        t[f"{p}.post_attention_layernorm.weight"] = vec(h, 1.0)
        for suffix, (out, fan_in) in shapes.items():
            name = f"{p}.{suffix}"
            t[f"{name}.weight"] = lin(out, fan_in)
            biased = cfg["attention_bias"] if suffix.startswith("self_attn") else mlp_bias
            if biased:
                t[f"{name}.bias"] = vec(out)
    t["model.norm.weight"] = vec(h, 1.0)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = lin(vocab, h)
    return {k: v.to(dtype).contiguous() for k, v in t.items()}


def _save(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    if shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
        total += sum(v.numel() * v.element_size() for v in part.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_tiny_llama(path, *, seed: int = 0, hidden: int = 64, intermediate: int = 128,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int | None = None,
                    tie: bool = False, dtype: torch.dtype = torch.float16, attention_bias: bool = False,
                    mlp_bias: bool = False, arch: str = "LlamaForCausalLM",
                    rope_scaling: dict | None = None, shards: int = 1,
                    extra_config: dict | None = None) -> Path:
    """Write a tiny model folder at ``path`` and return it. ``vocab`` defaults to the tokenizer's
    258 tokens; ``extra_config`` entries are merged into config.json last (e.g. rope_theta,
    sliding_window, or a broken field for an error test)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tokenizer(path)
    cfg = {
        "architectures": [arch],
        "model_type": MODEL_TYPES.get(arch, "llama"),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab or n_tokens,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie,
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "bos_token_id": BYTE_TOKENS,
        "eos_token_id": BYTE_TOKENS + 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "MistralForCausalLM":
        cfg["sliding_window"] = None
    cfg |= extra_config or {}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _save(path, _weights(cfg, seed, dtype, mlp_bias), shards)
    return path


# -- other architectures, built by transformers itself ----------------------------------------------

def _hf_config(tf, arch: str, common: dict, extra: dict):
    """The transformers config object for ``arch``, tiny; ``extra`` overrides fields."""
    gemma = {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 32}
    if arch == "Qwen2ForCausalLM":
        return tf.Qwen2Config(**common, **extra)
    if arch == "Qwen3ForCausalLM":
        return tf.Qwen3Config(**common, **({"head_dim": 16} | extra))
    if arch == "Phi3ForCausalLM":
        return tf.Phi3Config(**common, **({"pad_token_id": 0} | extra))
    if arch == "GemmaForCausalLM":
        return tf.GemmaConfig(**common, **({"head_dim": 16} | extra))
    if arch == "GraniteForCausalLM":
        # multipliers far from 1, so that each one shows if it is misapplied
        return tf.GraniteConfig(**common, **({"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                              "attention_multiplier": 0.2, "logits_scaling": 4.0,
                                              "pad_token_id": 0} | extra))
    if arch in ("GPTBigCodeForCausalLM", "GPT2LMHeadModel"):
        # BigCode: one key/value head; GPT-2: none grouped. num_key_value_heads must not appear in their configs
        plain = {k: v for k, v in common.items() if k != "num_key_value_heads"}
        defaults = {"n_inner": common["intermediate_size"], "n_positions": 256, "layer_norm_epsilon": 1e-5}
        if arch == "GPT2LMHeadModel":
            return tf.GPT2Config(**(plain | defaults | extra))
        return tf.GPTBigCodeConfig(**(plain | defaults | {"multi_query": True} | extra))
    if arch == "Starcoder2ForCausalLM":
        return tf.Starcoder2Config(**common, **({"norm_epsilon": 1e-5} | extra))
    if arch == "Glm4ForCausalLM":
        return tf.Glm4Config(**common, **({"head_dim": 16, "attention_bias": True, "pad_token_id": 0} | extra))
    if arch == "CohereForCausalLM":  # Command R+'s per-head q/k LayerNorms on
        return tf.CohereConfig(**common, **({"logit_scale": 0.25, "use_qk_norm": True, "pad_token_id": 0} | extra))
    if arch == "Cohere2ForCausalLM":  # a sliding layer (rotated) and a global one (no RoPE)
        return tf.Cohere2Config(**common, **({"logit_scale": 0.25, "sliding_window": 4096, "pad_token_id": 0,
                                              "layer_types": ["sliding_attention", "full_attention"]} | extra))
    if arch == "Gemma2ForCausalLM":
        return tf.Gemma2Config(**common, **(gemma | {"attn_logit_softcapping": 2.0,
                                                     "final_logit_softcapping": 3.0} | extra))
    text = (gemma | {"layer_types": ["sliding_attention", "full_attention"],
                     "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default",
                                                               "rope_theta": 10_000.0}}} | extra)
    if arch == "Gemma3ForCausalLM":
        return tf.Gemma3TextConfig(**common, **text)
    if arch == "Gemma3ForConditionalGeneration":
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**common, **text),
                               vision_config=vision, mm_tokens_per_image=4)
    if arch in VL_ARCHS:
        return vl_config(tf, arch, common, extra)
    raise ValueError(f"no tiny builder for {arch}")


HF_ARCHS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM",
            "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "GemmaForCausalLM", "GraniteForCausalLM",
            "Glm4ForCausalLM", "Starcoder2ForCausalLM", "GPTBigCodeForCausalLM", "GPT2LMHeadModel",
            "CohereForCausalLM", "Cohere2ForCausalLM")
HF_ARCHS += VL_ARCHS  # the vision-language models (tests.tinyvl)


def make_tiny_hf(path, arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float16,
                 layers: int = 2, extra_config: dict | None = None) -> Path:
    """A tiny random model of ``arch`` (one of :data:`HF_ARCHS`) written by transformers'
    save_pretrained, with the byte-level tokenizer. Hidden 64, intermediate 128, 4 heads of 16,
    2 KV heads, 258 tokens. Weights are redrawn as in :func:`make_tiny_llama` (linears ~
    N(0, 1/fan_in), norms ~ 1 + N(0, 0.1) in the model's own convention, biases ~ N(0, 0.1)), so
    attention is far from uniform; the Gemma configs get small windows and caps that bite."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tokenizer(path)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=n_tokens,
                  rms_norm_eps=1e-5, bos_token_id=BYTE_TOKENS, eos_token_id=BYTE_TOKENS + 1)
    config = _hf_config(tf, arch, common, extra_config or {})
    torch.manual_seed(seed)
    model = getattr(tf, arch)(config)
    offset = 0.0 if arch.startswith("Gemma") else 1.0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(part in name for part in VISION_PARTS):
                continue
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):  # Cohere's q/k norms are [heads, head_dim]
                p.copy_(offset + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(path)
    if arch in VL_ARCHS:
        write_processor_files(path, arch)
    return path


def trace_hooks(trace: list[dict]):
    """Forward-hook factories that record a transformers model's activations into ``trace[i]``:
    ``keep(i, key, use_input)`` stores a module's output (or first input), ``keep_layer_input(i)``
    (a pre-hook with kwargs) stores a decoder layer's input under "x"."""
    def keep(i, key, use_input=False):
        def hook(_mod, args, out):
            t = args[0] if use_input else (out[0] if isinstance(out, tuple) else out)
            trace[i][key] = t.detach().clone()
        return hook

    def keep_layer_input(i):
        def hook(_mod, args, kwargs):
            trace[i]["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    return keep, keep_layer_input


def logits_with_hooks(model, ids: torch.Tensor, hooks: list) -> torch.Tensor:
    """``model(ids).logits`` without gradients, then every handle in ``hooks`` removed (also when
    the forward raises), so that the traced model can run again untraced."""
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in hooks:
            h.remove()


def make_tiny_mixtral(path, *, seed: int = 0, dtype: torch.dtype = torch.float16, layers: int = 2,
                      experts: int = 4, per_token: int = 2, intermediate: int = 96,
                      extra_config: dict | None = None) -> Path:
    """A tiny random MixtralForCausalLM saved by transformers (which writes the checkpoint layout,
    ``block_sparse_moe.experts.<j>.w1/w3/w2`` and ``block_sparse_moe.gate``), with the byte-level
    tokenizer: hidden 64, 4 heads of 16, 2 KV heads, experts of width 96, 258 tokens. Linears and
    the router ~ N(0, 1/fan_in), so routing is far from uniform; norms ~ 1 + N(0, 0.1)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tokenizer(path)
    config = tf.MixtralConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=n_tokens,
                              rms_norm_eps=1e-5, bos_token_id=BYTE_TOKENS, eos_token_id=BYTE_TOKENS + 1,
                              num_local_experts=experts, num_experts_per_tok=per_token,
                              **(extra_config or {}))
    torch.manual_seed(seed)
    model = tf.MixtralForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:  # in memory the experts are stacked [E, out, in]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(path)
    return path


# -- remote-code architectures (no transformers class), from the key names ExLlamaV2 reads ----------

# Each is a Llama checkpoint with one thing changed; :func:`transformers_twin` builds the
# transformers model that computes the same function, the reference their forward is checked against.
REMOTE_ARCHS = ("YiForCausalLM", "OrionForCausalLM", "IndexForCausalLM", "MiniCPMForCausalLM", "InternLM2ForCausalLM")
_YI_NORMS = {".input_layernorm.": ".ln1.", ".post_attention_layernorm.": ".ln2."}
# MiniCPM's settings in the tiny model: far from neutral, as the Granite ones
MINICPM = {"scale_emb": 3.0, "scale_depth": 1.4, "dim_model_base": 16}


def make_tiny_remote(path, arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float16, layers: int = 2) -> Path:
    """A tiny model of a remote-code family (one of :data:`REMOTE_ARCHS`) as its checkpoints lay it
    out: Yi's norms named ln1/ln2, Orion's LayerNorms with biases, Index's untied head with
    ``norm_head``, MiniCPM's scale_emb / scale_depth / dim_model_base."""
    from safetensors.torch import load_file

    model_type = {"YiForCausalLM": "Yi", "OrionForCausalLM": "orion", "IndexForCausalLM": "index",
                  "MiniCPMForCausalLM": "minicpm", "InternLM2ForCausalLM": "internlm2"}[arch]
    extra = {"model_type": model_type} | ({"norm_head": True} if arch == "IndexForCausalLM" else {}) \
        | (MINICPM if arch == "MiniCPMForCausalLM" else {})
    path = make_tiny_llama(path, seed=seed, dtype=dtype, layers=layers, arch=arch, extra_config=extra)
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    if arch == "YiForCausalLM":
        for old, new in _YI_NORMS.items():
            tensors = {k.replace(old, new): v for k, v in tensors.items()}
    if arch == "OrionForCausalLM":
        for name in [n for n in tensors if "norm" in n]:
            tensors[name.replace(".weight", ".bias")] = (0.1 * torch.randn(tensors[name].shape, generator=g)).to(dtype)
    if arch == "InternLM2ForCausalLM":
        tensors = _to_internlm2(tensors, json.loads((path / "config.json").read_text()))
    _save(path, tensors, 1)
    return path


_INTERNLM2 = (("model.embed_tokens.", "model.tok_embeddings."), ("lm_head.", "output."),
              (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
              (".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
              (".mlp.up_proj.", ".feed_forward.w3."), (".mlp.down_proj.", ".feed_forward.w2."))


def _head_shape(cfg: dict) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a config.json dict."""
    heads = cfg["num_attention_heads"]
    return heads, cfg["num_key_value_heads"], cfg["hidden_size"] // heads


def _to_internlm2(tensors: dict, cfg: dict) -> dict:
    """A Llama checkpoint in InternLM2's layout: its names, and q/k/v fused into one wqkv with, per
    key/value head, that head's group of query heads, then its key head, then its value head."""
    heads, kv, d = _head_shape(cfg)
    out = {}
    for name, t in tensors.items():
        if ".self_attn.q_proj." in name:
            p = name.split(".self_attn.")[0]
            q = t.view(kv, heads // kv * d, -1)
            k = tensors[f"{p}.self_attn.k_proj.weight"].view(kv, d, -1)
            v = tensors[f"{p}.self_attn.v_proj.weight"].view(kv, d, -1)
            out[f"{p}.attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, t.shape[1]).contiguous()
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            out[_rename(name, _INTERNLM2)] = t
    return out


def _from_internlm2(tensors: dict, cfg: dict) -> dict:
    """The inverse of :func:`_to_internlm2`: InternLM2's checkpoint names and wqkv back in Llama's."""
    heads, kv, d = _head_shape(cfg)
    out = {}
    for name, t in tensors.items():
        if ".attention.wqkv." in name:
            p = name.split(".attention.")[0]
            blocks = t.view(kv, (heads // kv + 2) * d, -1)
            q, k, v = blocks.split([heads // kv * d, d, d], dim=1)
            for short, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{p}.self_attn.{short}.weight"] = part.reshape(-1, t.shape[1])
            continue
        out[_rename(name, [(new, old) for old, new in _INTERNLM2])] = t
    return out


def _rename(name: str, pairs) -> str:
    """Each (old, new) of ``pairs`` applied to ``name``: an ``old`` that starts with "." anywhere in
    it, any other only at its start."""
    for old, new in pairs:
        if old.startswith("."):
            name = name.replace(old, new)
        elif name.startswith(old):
            name = new + name[len(old):]
    return name


def transformers_twin(path, arch: str):
    """The transformers model that computes what the remote-code model at ``path`` does, with its
    weights, in float32: a LlamaForCausalLM (Yi: norms renamed back; Orion: its RMSNorms replaced
    by LayerNorms with the checkpoint's biases; Index: head rows L2-normalized, as its NormHead
    does at inference) or, for MiniCPM, a GraniteForCausalLM with the same multipliers
    (embedding x scale_emb, branches x scale_depth / sqrt(layers), logits / (hidden /
    dim_model_base))."""
    import transformers as tf
    from safetensors.torch import load_file

    raw = json.loads((Path(path) / "config.json").read_text())
    keep = {k: raw[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta",
                                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")}
    if arch == "MiniCPMForCausalLM":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(
            **keep, embedding_multiplier=raw["scale_emb"],
            residual_multiplier=raw["scale_depth"] / math.sqrt(raw["num_hidden_layers"]),
            logits_scaling=raw["hidden_size"] / raw["dim_model_base"],
            attention_multiplier=(raw["hidden_size"] // raw["num_attention_heads"]) ** -0.5))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**keep))
    tensors = {k: v.float() for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    if arch == "YiForCausalLM":
        for old, new in _YI_NORMS.items():
            tensors = {k.replace(new, old): v for k, v in tensors.items()}
    if arch == "InternLM2ForCausalLM":
        tensors = _from_internlm2(tensors, raw)
    if arch == "OrionForCausalLM":
        def swap(parent, name):
            setattr(parent, name, torch.nn.LayerNorm(raw["hidden_size"], eps=raw["rms_norm_eps"]))
        for layer in model.model.layers:
            swap(layer, "input_layernorm")
            swap(layer, "post_attention_layernorm")
        swap(model.model, "norm")
    if arch == "IndexForCausalLM":
        tensors["lm_head.weight"] = torch.nn.functional.normalize(tensors["lm_head.weight"], dim=-1)
    model.load_state_dict(tensors, strict=not raw["tie_word_embeddings"])
    return model.float().eval()
