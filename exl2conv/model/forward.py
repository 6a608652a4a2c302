"""Float32 forward pass of a Llama-family model, one module at a time.

Each function runs on whatever device its inputs are on and handles a batch of B rows.
Attention and MLP return the full module output (residual included, as ExLlamaV2's
``hidden_states``) and, on request, the intermediates GPTQ builds its Hessians from (spec 3.2).
Weights are HF-oriented ``[out, in]``, unpadded, float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .arch import (embedding_tensor, final_norm_tensor, head_spec, layer_linears, spec_of,
                   unquantized_tensors)
from .config import ModelConfig
from .weights import WeightIndex

ACTIVATIONS = {"silu": F.silu}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] f32, weight [H] -> [..., H]: x * rsqrt(mean(x^2) + eps) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [B, L] int64, table [V, H] -> f32 [B, L, H] on the table's device.

    Ids at or above V become 0 and negative ids (noise rows) look up row 0 (spec 2.4)."""
    ids = ids.to(table.device)
    ids = torch.where(ids >= table.shape[0], 0, ids).clamp(min=0)
    return F.embedding(ids, table).float()


# -- rotary embeddings ---------------------------------------------------------------------------

def _llama3(inv: torch.Tensor, rs: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth ramp between."""
    factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (1 - smooth) * inv / factor + smooth * inv


def _yarn(inv: torch.Tensor, rs: dict, cfg: ModelConfig, base: float) -> tuple[torch.Tensor, float]:
    """YaRN as transformers computes it: interpolate low frequencies by ``factor``, keep high ones,
    ramp between dims set by beta_fast/beta_slow; cos and sin are scaled by the attention factor.
    (ExLlamaV2 differs: it ramps on max_position_embeddings and only when that exceeds the
    original length.)"""
    dim = cfg.head_dim
    factor = float(rs["factor"])
    orig = float(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(rs.get("beta_fast") or 32), corr_dim(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=inv.dtype) - low) / (high - low)).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp), float(attn)


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each f32 [length, head_dim], in the rotate-half (NeoX) layout.

    Angles are computed in float64 on the CPU: at position 2047 float32 angles are off by ~1e-4
    rad. Positions are divided by the linear scale (-rs or the config's "linear" factor); the base
    carries the NTK alpha (-ra); "llama3" and "yarn" reshape the frequencies."""
    d, base = cfg.head_dim, cfg.rope_base
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    gain = 1.0
    if cfg.rope_type == "llama3":
        inv = _llama3(inv, cfg.rope_scaling)
    elif cfg.rope_type == "yarn":
        inv, gain = _yarn(inv, cfg.rope_scaling, cfg, base)
    pos = torch.arange(length, dtype=torch.float64) / cfg.rope_scale
    angles = torch.outer(pos, inv)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos() * gain, angles.sin() * gain
    return cos.float().to(device), sin.float().to(device)


class RotaryCache:
    """rope_tables per device, grown as longer rows arrive; hand it to :func:`attention`."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            cached = rope_tables(self.cfg, max(length, 256), device)
            self._tables[device] = cached
        return cached[0][:length], cached[1][:length]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, d], cos/sin [L, d] -> [B, heads, L, d]."""
    return x * cos + _rotate_half(x) * sin


# -- modules -------------------------------------------------------------------------------------

def _linear(x: torch.Tensor, w: dict, key: str) -> torch.Tensor:
    return F.linear(x, w[key], w.get(f"{key}.bias"))


def _attn_mask(cfg: ModelConfig, length: int, device) -> torch.Tensor | None:
    """Boolean [L, L] mask (True = attend) when a sliding window cuts into the row; None means
    plain causal. Query i sees keys j with i - window < j <= i, as transformers' Mistral."""
    window = cfg.sliding_window
    if not window or length <= window:
        return None
    i = torch.arange(length, device=device).view(-1, 1)
    j = torch.arange(length, device=device).view(1, -1)
    return (j <= i) & (i - j < window)


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig, rope,
              capture: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """x f32 [B, L, H] -> (x + o_proj(attn(rmsnorm(x))) [B, L, H], intermediates or None).

    Causal from position 0, GQA by repeating KV heads. ``rope`` is a :class:`RotaryCache` or a
    (cos, sin) pair with at least L rows. With ``capture``, intermediates are
    {"post_norm": [B, L, H], "attn_output": [B, L, heads*head_dim]}."""
    b, length, _ = x.shape
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = rope.get(length, x.device) if isinstance(rope, RotaryCache) else rope
    cos, sin = cos[:length].to(x.device), sin[:length].to(x.device)

    n = rms_norm(x, w["input_layernorm"], cfg.rms_norm_eps)
    q = _linear(n, w, "q_proj").view(b, length, heads, d).transpose(1, 2)
    k = _linear(n, w, "k_proj").view(b, length, kv, d).transpose(1, 2)
    v = _linear(n, w, "v_proj").view(b, length, kv, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv != heads:
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
    mask = _attn_mask(cfg, length, x.device)
    if mask is None:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    a = a.transpose(1, 2).reshape(b, length, heads * d)
    y = x + _linear(a, w, "o_proj")
    return y, ({"post_norm": n, "attn_output": a} if capture else None)


def mlp(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig, rope=None,
        capture: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """x f32 [B, L, H] -> (x + down(act(gate(n)) * up(n)) [B, L, H], intermediates or None),
    n = rmsnorm(x). Intermediates: {"post_norm": n [B, L, H], "pre_down": [B, L, intermediate]}.
    ``rope`` is unused; it is accepted so that attention and MLP share one call shape.
    pre_down is not clamped: ExLlamaV2 clamps it to the FP16 range, which float32 never needs."""
    act = ACTIVATIONS[spec_of(cfg).act]
    n = rms_norm(x, w["post_attention_layernorm"], cfg.rms_norm_eps)
    h = act(_linear(n, w, "gate_proj")) * _linear(n, w, "up_proj")
    y = x + _linear(h, w, "down_proj")
    return y, ({"post_norm": n, "pre_down": h} if capture else None)


def final_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x f32 [B, L, H] -> [B, L, H]."""
    return rms_norm(x, weight, eps)


def logits(x: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """x f32 [B, L, H] (after the final norm), head_weight [V, H] -> f32 [B, L, V]."""
    return F.linear(x, head_weight.float())


# -- weights -------------------------------------------------------------------------------------

def load_layer_weights(index: WeightIndex, cfg: ModelConfig, i: int, part: str,
                       device=None) -> dict[str, torch.Tensor]:
    """The f32 tensors :func:`attention` (part "attn") or :func:`mlp` (part "mlp") needs for
    layer ``i``, keyed by short name: the norm, each linear's weight, "<short>.bias" if biased."""
    spec = spec_of(cfg)
    norm_1, norm_2 = unquantized_tensors(cfg, i)
    norm_key, norm_tensor = (spec.norm_1, norm_1) if part == "attn" else (spec.norm_2, norm_2)
    w = {norm_key: index.get(norm_tensor, device=device)}
    for short, lin in layer_linears(cfg, i, part).items():
        w[short] = index.get(lin.tensor, device=device)
        if lin.bias:
            w[f"{short}.bias"] = index.get(lin.bias_tensor, device=device)
    return w


def run_model(index: WeightIndex, cfg: ModelConfig, ids: torch.Tensor, device=None) -> torch.Tensor:
    """ids [B, L] -> f32 logits [B, L, V]: the whole model, one layer's weights in memory at a time.
    For checks and perplexity on small models; the converter drives the modules itself."""
    x = embed(ids, index.get(embedding_tensor(cfg), device=device))
    rope = RotaryCache(cfg)
    for i in range(cfg.num_layers):
        x, _ = attention(x, load_layer_weights(index, cfg, i, "attn", device), cfg, rope)
        x, _ = mlp(x, load_layer_weights(index, cfg, i, "mlp", device), cfg)
    x = final_norm(x, index.get(final_norm_tensor(cfg), device=device), cfg.rms_norm_eps)
    return logits(x, index.get(head_spec(cfg, index).tensor, device=device))
