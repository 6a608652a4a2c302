"""A Llama-shaped EXL2 folder packed directly from random codes and scales (exl2conv.pack), without
a conversion: for the runtime's GPU tests and benchmarks/bench_runtime.py (a 32-layer Llama-2-7B
conversion would take most of an hour, and speed does not depend on the values)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from exl2conv.pack import pack_linear
from exl2conv.qparams import qp

BODY = ((5, 32, 0.1), (4, 32, 0.9))        # about 4.1 bits per weight, as a -b 4.0 layer mostly gets
HEAD = ((8, 128, 0.15), (6, 128, 0.85))    # the default -hb 6 head layout


def packed_linear(k: int, out: int, parts: tuple, gen: torch.Generator, dev: str) -> dict[str, torch.Tensor]:
    """One linear's EXL2 tensors (on the CPU) for ``k`` inputs and ``out`` outputs, N padded to 32:
    random codes, scale indices and act-order permutation, packed on ``dev``. The scale maxima make
    the largest weights about ``1/sqrt(k)``, so that activations neither vanish nor overflow fp16."""
    n = -(-out // 32) * 32
    groups = qp(*parts).groups(k)
    codes = torch.cat([torch.randint(0, 1 << g.bits, (g.rows, n), generator=gen, device=dev, dtype=torch.int32)
                       for g in groups])
    qs = torch.randint(1, 17, (len(groups), n), generator=gen, device=dev)
    qmax = torch.full((len(groups),), (k ** -0.5) / 4, device=dev)
    perm = torch.randperm(k, generator=gen, device=dev)
    return {key: v.cpu() for key, v in pack_linear(codes, qs, qmax, groups, perm).items()}


def make_random_exl2(path: Path, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                     layers: int, head_dim: int | None = None, eps: float = 1e-5, seed: int = 0) -> Path:
    """A LlamaForCausalLM EXL2 folder (config.json, output.safetensors) of random packed weights."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    d = head_dim or hidden // heads
    h, i = hidden, intermediate
    path.mkdir(parents=True, exist_ok=True)
    emb = torch.randn(vocab, h, generator=torch.Generator().manual_seed(seed)) * 0.02
    t = {"model.embed_tokens.weight": emb.half(), "model.norm.weight": torch.ones(h).half()}
    t.update({f"lm_head.{key}": v for key, v in packed_linear(h, vocab, HEAD, gen, dev).items()})
    shapes = [("self_attn.q_proj", h, heads * d), ("self_attn.k_proj", h, kv_heads * d),
              ("self_attn.v_proj", h, kv_heads * d), ("self_attn.o_proj", heads * d, h),
              ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i), ("mlp.down_proj", i, h)]
    for n in range(layers):
        p = f"model.layers.{n}."
        t[p + "input_layernorm.weight"] = torch.ones(h).half()
        t[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
        for name, k, out in shapes:
            t.update({f"{p}{name}.{key}": v for key, v in packed_linear(k, out, BODY, gen, dev).items()})
    save_file(t, str(path / "output.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": d,
           "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": eps, "rope_theta": 10000.0,
           "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
