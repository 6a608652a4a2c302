"""Float32 forward pass of a Llama-family model, one module at a time.

Each function runs on whatever device its inputs are on and handles a batch of B rows.
Attention and MLP return the full module output (residual included, as ExLlamaV2's
``hidden_states``) and, on request, the intermediates GPTQ builds its Hessians from (ExLlamaV2's
conversion/measure.py, measure_quant: the inputs of each linear).
Weights are HF-oriented ``[out, in]``, unpadded, float32, in a dict of tensors by short name.
The modules' forwards also take ``layer``, the decoder layer's index (per-layer sliding windows
and RoPE depend on it; None: the config's defaults), and ``hook``, a callable ``(x, w, key) -> y``
that computes every linear instead of :func:`plain_linear` (the measurement's candidate forwards).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .attention_kernels import BlockedAttention, HalfAttention, grad_mode
from .arch import (MOE_SHARED_INPUT, embedding_tensor, final_norm_tensor, head_spec, layer_linears,
                   norm_bias_tensor, norm_weights, position_tensor, router_tensor, spec_of)
from .config import ModelConfig
from .weights import WeightIndex

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# The captured intermediate that is a module's normed input (what q/k/v and gate/up read).
NORMED_INPUT = "post_norm"
# MoE capture: tokens routed to each expert in each row, int64 [B, E].
EXPERT_TOKENS = "expert_tokens"
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] f32, weight [H] -> [..., H]: x * rsqrt(mean(x^2) + eps) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def norm(x: torch.Tensor, weight: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None = None
         ) -> torch.Tensor:
    """The architecture's norm over the last dimension: RMSNorm, or LayerNorm (statistics in the
    input's float32, plus ``bias`` where the architecture has one)."""
    if spec_of(cfg).norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, cfg.norm_eps)
    return rms_norm(x, weight, cfg.norm_eps)


def _module_norm(x: torch.Tensor, w: dict, key: str, cfg: ModelConfig) -> torch.Tensor:
    """Norm ``key`` of a module's weight dict (its bias under "<key>.bias") applied to ``x``."""
    return norm(x, w[key], cfg, w.get(f"{key}.bias"))


def embed(ids: torch.Tensor, table: torch.Tensor, scale: float = 1.0,
          positions: torch.Tensor | None = None) -> torch.Tensor:
    """ids [B, L] int64, table [V, H] -> f32 [B, L, H] on the table's device, times ``scale``
    (``cfg.embed_scale``: Gemma's sqrt(hidden)), plus rows 0..L-1 of the learned position table
    ``positions`` where the model has one (GPTBigCode).

    Ids at or above V become 0 (ExLlamaV2's conversion/measure.py, embeddings) and negative ids
    (noise rows) look up row 0."""
    ids = ids.to(table.device)
    ids = torch.where(ids >= table.shape[0], 0, ids).clamp(min=0)
    x = F.embedding(ids, table).float()
    x = x * scale if scale != 1.0 else x
    if positions is not None:
        x = x + positions[: ids.shape[-1]].to(x.device, torch.float32)
    return x


def load_positions(index: WeightIndex, cfg: ModelConfig, device=None) -> torch.Tensor | None:
    """The learned position table [positions, hidden] f32, or None where the model has none."""
    name = position_tensor(cfg)
    return index.get(name, device=device) if name else None


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """tanh(x / cap) * cap, or x unchanged when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


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
    dim = cfg.rotary_dim
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
    """(cos, sin), each f32 [length, rot] for the rot = ``cfg.rotary_dim`` dimensions RoPE
    rotates, in the layout of the architecture's pairing (:func:`apply_rope`): NeoX's halves
    (frequency j at j and j + rot/2) or GPT-J's neighbours (frequency j at 2j and 2j + 1).

    Angles are computed in float64 on the CPU: at position 2047 float32 angles are off by ~1e-4
    rad. Positions are divided by the linear scale (-rs or the config's "linear" factor); the base
    carries the NTK alpha (-ra); "llama3" and "yarn" reshape the frequencies.

    Qwen2-VL's multimodal RoPE (``ArchSpec.mrope``) is this rotation for text: its three sections
    of frequencies take a token's temporal, height and width positions, all three the token's
    index in a text-only row. ExLlamaV2 rounds these models' frequencies to float16 (rope.py,
    get_rope_params, ``rope_freq_half``); transformers keeps them in float32, and we follow the
    model (docs/exllamav2-architectures.md gives the difference)."""
    d, base = cfg.rotary_dim, cfg.rope_base
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    gain = 1.0
    if cfg.rope_type == "llama3":
        inv = _llama3(inv, cfg.rope_scaling)
    elif cfg.rope_type == "yarn":
        inv, gain = _yarn(inv, cfg.rope_scaling, cfg, base)
    pos = torch.arange(length, dtype=torch.float64) / cfg.rope_scale
    angles = torch.outer(pos, inv)
    if spec_of(cfg).rope_style == "gptj":
        angles = angles.repeat_interleave(2, dim=-1)
    else:
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


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J's pairing."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox") -> torch.Tensor:
    """x [B, heads, L, d], cos/sin [L, rot] from :func:`rope_tables` -> [B, heads, L, d]: the
    first rot dimensions rotated in ``style``'s pairing, the rest passed through."""
    rot = cos.shape[-1]
    turn = _rotate_pairs if style == "gptj" else _rotate_half
    if rot == x.shape[-1]:
        return x * cos + turn(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + turn(head) * sin, tail), dim=-1)


# -- modules -------------------------------------------------------------------------------------

def _linear(x: torch.Tensor, w: dict, key: str, hook=None) -> torch.Tensor:
    if hook is not None:  # the measurement's corrected candidate forwards (exl2conv.candidates)
        return hook(x, w, key)
    return plain_linear(x, w, key)


def plain_linear(x: torch.Tensor, w: dict, key: str) -> torch.Tensor:
    """Linear ``key`` of ``w`` (its bias, if any, from ``"<key>.bias"``) applied to ``x``."""
    weight = w[key]
    if weight.dtype != x.dtype and weight.element_size() < x.element_size():
        # a weight held in its 2-byte source dtype (WeightIndex.held_dtype): widened exactly, for
        # this product only
        weight = weight.to(x.dtype)
    return F.linear(x, weight, w.get(f"{key}.bias"))


def _attn_mask(cfg: ModelConfig, length: int, device, layer: int | None = None) -> torch.Tensor | None:
    """Boolean [L, L] mask (True = attend) when a sliding window cuts into the row; None means
    plain causal. Query i sees keys j with i - window < j <= i, as transformers' Mistral."""
    window = cfg.sliding_window if layer is None else cfg.window(layer)
    if not window or length <= window:
        return None
    i = torch.arange(length, device=device).view(-1, 1)
    j = torch.arange(length, device=device).view(1, -1)
    return (j <= i) & (i - j < window)


def plain_causal(cfg: ModelConfig, length: int) -> bool:
    """Whether every layer's attention over rows of ``length`` is plain causal attention (no
    sliding window cutting in, no softcapped scores): what :func:`attention_kernels.grad_attention` covers."""
    if cfg.attn_softcap is not None:
        return False
    windows = [cfg.sliding_window] + [cfg.window(i) for i in range(cfg.num_layers)]
    return all(not w or length <= w for w in windows)


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig, rope,
              capture: bool = False, *, layer: int | None,
              hook=None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """x f32 [B, L, H] -> (x + o_proj(attn(rmsnorm(x))) [B, L, H], intermediates or None).

    Causal from position 0, GQA by repeating KV heads. ``rope`` is a :class:`RotaryCache` or a
    (cos, sin) pair with at least L rows. With ``capture``, intermediates are
    {"post_norm": [B, L, H], "attn_output": [B, L, heads*head_dim]}. ``layer`` has no default: a
    call that left it out would run every layer with the config's window and RoPE, wrong for the
    models whose layers differ (Gemma 2 and 3, Cohere2); None says so on purpose."""
    n = _module_norm(x, w, spec_of(cfg).attn_norms[0], cfg)
    o, a = _attention_branch(n, w, cfg, rope, layer, hook)
    return x + o, ({"post_norm": n, "attn_output": a} if capture else None)


def _attention_branch(n: torch.Tensor, w: dict, cfg: ModelConfig, rope, layer: int | None,
                      hook) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention on its normed input ``n`` [B, L, H]: (what it adds to the residual stream,
    the attention's output before o_proj [B, L, heads*head_dim])."""
    b, length, _ = n.shape
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    spec = spec_of(cfg)
    rotates = _rotates(cfg, layer)
    if rotates:
        cos, sin = _layer_rope(cfg, rope, layer, length, n.device)
    q = _linear(n, w, "q_proj", hook).view(b, length, heads, d).transpose(1, 2)
    k = _linear(n, w, "k_proj", hook).view(b, length, kv, d).transpose(1, 2)
    v = _linear(n, w, "v_proj", hook).view(b, length, kv, d).transpose(1, 2)
    if cfg.clip_qkv is not None:  # DBRX clamps its fused Wqkv output (ExLlamaV2 does not: moe_config)
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    if "q_norm" in w:
        q, k = _qk_norm(q, w["q_norm"], cfg), _qk_norm(k, w["k_norm"], cfg)
    if rotates:
        q, k = apply_rope(q, cos, sin, spec.rope_style), apply_rope(k, cos, sin, spec.rope_style)
    if kv != heads:
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
    mask = _attn_mask(cfg, length, n.device, layer)
    if cfg.attn_softcap is None:
        mode = grad_mode() if mask is None and q.is_cuda else None
        if mode == "half":
            a = HalfAttention.apply(q, k, v, cfg.attn_scale)
        elif mode == "blocked" and q.requires_grad:
            a = BlockedAttention.apply(q, k, v, cfg.attn_scale)
        elif mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.attn_scale)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=cfg.attn_scale)
    else:
        a = _capped_attention(q, k, v, cfg, mask)
    a = a.transpose(1, 2).reshape(b, length, heads * d)
    return _branch_out(_linear(a, w, "o_proj", hook), w, spec.attn_norms, cfg), a


def _rotates(cfg: ModelConfig, layer: int | None) -> bool:
    """Whether ``layer``'s attention applies RoPE: not without RoPE (learned positions), and
    for Cohere2 only in its sliding-window layers."""
    spec = spec_of(cfg)
    if spec.rope_style == "none":
        return False
    return not (spec.rope_sliding_only and layer is not None and not cfg.sliding_layers[layer])


def _qk_norm(t: torch.Tensor, weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A q or k head norm on ``t`` [B, heads, L, d] over each head's d dimensions, as
    ``ArchSpec.head_norm`` says: RMS (Qwen3, Gemma3) or LayerNorm (Cohere)."""
    if spec_of(cfg).head_norm == "layer":
        return F.layer_norm(t, (t.shape[-1],), eps=cfg.norm_eps) * _head_norm(weight)
    return rms_norm(t, _head_norm(weight), cfg.norm_eps)


def parallel(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig, rope,
             capture: bool = False, *, layer: int | None,
             hook=None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """A parallel decoder layer (Cohere): x -> x + attn(n) + mlp(n), n = norm(x), the attention's
    and the MLP's linears all in ``w``. Intermediates: post_norm (the input of q/k/v, gate and up),
    attn_output, pre_down."""
    n = _module_norm(x, w, spec_of(cfg).attn_norms[0], cfg)
    o_attn, a = _attention_branch(n, w, cfg, rope, layer, hook)
    o_mlp, h = _mlp_branch(n, w, cfg, hook)
    y = x + o_attn + o_mlp
    return y, ({"post_norm": n, "attn_output": a, "pre_down": h} if capture else None)


def _branch_out(o: torch.Tensor, w: dict, norms: tuple[str, ...], cfg: ModelConfig) -> torch.Tensor:
    """What a module adds to the residual stream: its output times the config's residual scale
    (Granite, MiniCPM), then its post-norm where the architecture has one (Gemma2/3, Glm4)."""
    if cfg.residual_scale != 1.0:
        o = o * cfg.residual_scale
    if len(norms) > 1:
        o = _module_norm(o, w, norms[1], cfg)
    return o


def _head_norm(weight: torch.Tensor) -> torch.Tensor:
    """A q/k norm weight [d] or, as the EXL2 file stores it, [heads, d] -> broadcastable over
    [B, heads, L, d]."""
    return weight if weight.dim() == 1 else weight.unsqueeze(1)


def _layer_rope(cfg: ModelConfig, rope, layer: int | None, length: int, device):
    """(cos, sin) [L, d] for ``layer``: Gemma3's sliding layers use plain RoPE on their own base."""
    if cfg.rope_local_theta is not None and layer is not None and cfg.window(layer) is not None:
        local = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None,
                                    rope_scale=1.0, rope_alpha=1.0)
        return rope_tables(local, length, device)
    cos, sin = rope.get(length, device) if isinstance(rope, RotaryCache) else rope
    return cos[:length].to(device), sin[:length].to(device)


def _capped_attention(q, k, v, cfg: ModelConfig, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention with tanh-capped scores (Gemma2): q/k/v [B, heads, L, d] -> [B, heads, L, d]."""
    length = q.shape[2]
    scale = cfg.attn_scale if cfg.attn_scale is not None else q.shape[-1] ** -0.5
    scores = softcap(q @ k.transpose(-1, -2) * scale, cfg.attn_softcap)
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def mlp(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig, rope=None,
        capture: bool = False, layer: int | None = None,
        hook=None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """x f32 [B, L, H] -> (x + down(act(gate(n)) * up(n)) [B, L, H], intermediates or None),
    n = norm(x); without a gate (Starcoder2), down(act(up(n))). Intermediates: {"post_norm": n
    [B, L, H], "pre_down": [B, L, intermediate]}. ``rope`` and ``layer`` are unused; they are
    accepted so that attention and MLP share one call shape.
    pre_down is not clamped: ExLlamaV2 clamps it to the FP16 range, which float32 never needs.
    An MoE architecture runs :func:`moe_mlp` instead."""
    spec = spec_of(cfg)
    if spec.moe:
        return moe_mlp(x, w, cfg, rope, capture, layer, hook)
    n = _module_norm(x, w, spec.mlp_norms[0], cfg)
    o, h = _mlp_branch(n, w, cfg, hook)
    return x + o, ({"post_norm": n, "pre_down": h} if capture else None)


def _mlp_branch(n: torch.Tensor, w: dict, cfg: ModelConfig, hook) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense MLP on its normed input ``n``: (what it adds to the residual stream, down_proj's
    input [B, L, intermediate])."""
    spec = spec_of(cfg)
    act = ACTIVATIONS[spec.act]
    if "gate_proj" in spec.mlp_linears:
        h = act(_linear(n, w, "gate_proj", hook))
        up = _linear(n, w, "up_proj", hook)
        # without autograd the product goes into the activation's own output (a tensor of its own):
        # one [B, L, intermediate] float32 less at once, 0.17 GiB for 2 rows of a Llama-2-7B
        h = h.mul_(up) if not torch.is_grad_enabled() else h * up
        del up
    else:
        h = act(_linear(n, w, "up_proj", hook))
    return _branch_out(_linear(h, w, "down_proj", hook), w, spec.mlp_norms, cfg), h


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router [E, H] -> (weights f32 [T, k], experts int64 [T, k]), as Mixtral routes:
    softmax over the router logits in float32, the top k, those k weights renormalized to sum 1
    unless ``renormalize`` is off (a Qwen3-MoE with norm_topk_prob false keeps the softmax's values)."""
    probs = torch.softmax(F.linear(x, router.to(x.dtype)).float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights), experts


def moe_routes(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MoE block's routing of x f32 [B, L, H]: (the experts' input n = norm(x) [B * L, H], the
    routing weights f32 [B * L, k], the experts int64 [B * L, k]), as :func:`moe_mlp` computes them."""
    spec = spec_of(cfg)
    flat = _module_norm(x, w, spec.mlp_norms[0], cfg).reshape(-1, x.shape[-1])
    weights, experts = route(flat, w[spec.moe_router], cfg.num_experts_per_tok, cfg.moe_renormalize)
    return flat, weights, experts


def moe_mlp(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig, rope=None,
            capture: bool = False, layer: int | None = None, hook=None) -> tuple[torch.Tensor, dict | None]:
    """Mixtral's sparse MoE block: x f32 [B, L, H] -> (x + sum over the k routed experts of
    weight * w2(act(w1(n)) * w3(n)) [B, L, H], intermediates or None), n = rmsnorm(x).
    ``w`` holds the router under ``spec.moe_router`` and expert j's linears as "w1.<j>" etc.

    Intermediates, for the Hessians and the coverage report (ExLlamaV2's conversion/measure.py,
    measure_moe_mlp), per row r of the B:
    {"post_norm": n [B, L, H]; EXPERT_TOKENS: int64 [B, E] tokens routed to each expert;
    MOE_SHARED_INPUT: list of B, n[r] [L, H] if expert 0 got a token in row r, else None;
    "pre_down.<j>": list of B, expert j's act(w1) * w3 on its tokens of row r [T_rj, I], or None
    where it got none}. A None row does not count towards that Hessian's row count."""
    spec = spec_of(cfg)
    act = ACTIVATIONS[spec.act]
    b, length, hidden = x.shape
    flat, weights, experts = moe_routes(x, w, cfg)
    n = flat.view(b, length, hidden)
    out = torch.zeros_like(flat)
    inter: dict | None = {"post_norm": n} if capture else None
    counts = torch.zeros(b, cfg.num_experts, dtype=torch.int64)
    for j in range(cfg.num_experts):
        tok, slot = torch.where(experts == j)  # tokens in ascending order, so rows come in order
        if capture:
            per_row = torch.bincount(tok // length, minlength=b).cpu()
            counts[:, j] = per_row
        if tok.numel() == 0:
            if capture:
                inter[f"pre_down.{j}"] = [None] * b
            continue
        xs = flat[tok]
        h = act(_linear(xs, w, f"w1.{j}", hook)) * _linear(xs, w, f"w3.{j}", hook)
        out.index_add_(0, tok, _linear(h, w, f"w2.{j}", hook) * weights[tok, slot, None])
        if capture:
            inter[f"pre_down.{j}"] = [t if t.shape[0] else None for t in h.split(per_row.tolist())]
    if capture:
        inter[EXPERT_TOKENS] = counts
        inter[MOE_SHARED_INPUT] = [n[r] if counts[r, 0] else None for r in range(b)]
    return x + out.view(b, length, hidden), inter


def final_norm(x: torch.Tensor, weight: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """x f32 [B, L, H] -> [B, L, H]."""
    return norm(x, weight, cfg, bias)


def logits(x: torch.Tensor, head_weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """x f32 [B, L, H] (after the final norm), head_weight [V, H] -> f32 [B, L, V]: times the
    config's logit scale, then tanh-capped at ``cfg.final_softcap`` (Gemma2) where it has one."""
    out = F.linear(x, head_weight.float())
    if cfg.logit_scale != 1.0:
        out = out * cfg.logit_scale
    return softcap(out, cfg.final_softcap)


def log_probs(x: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, cfg: ModelConfig,
              norm_bias: torch.Tensor | None = None) -> torch.Tensor:
    """x f32 [..., H] (the residual stream before the final norm) -> next-token log-probabilities
    f32 [..., vocab_size]: final norm, head, softcap, the padded vocabulary rows cut off."""
    out = logits(final_norm(x, norm_weight, cfg, norm_bias), head_weight, cfg)
    return torch.log_softmax(out[..., :cfg.vocab_size], dim=-1)


# -- weights -------------------------------------------------------------------------------------

def load_norm(index: WeightIndex, cfg: ModelConfig, name: str, device=None) -> torch.Tensor:
    """A norm weight as the forward uses it: f32, with the architecture's offset added."""
    w = index.get(name, device=device)
    return w + cfg.norm_offset if cfg.norm_offset else w


def load_linear(index: WeightIndex, lin, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A linear's weight [out, in] (``lin``: its :class:`LinearSpec`): its rows of a fused source,
    and a weight stored [in, out] (GPT-2's Conv1D; DBRX's expert w2, its rows ``in_rows``) transposed."""
    if lin.in_rows:
        return index.get(lin.tensor, dtype=dtype, device=device, rows=(lin.in_rows,)).T.contiguous()
    if not lin.transposed:
        return index.get(lin.tensor, dtype=dtype, device=device, rows=lin.rows)
    w = index.get(lin.tensor, dtype=dtype, device=device).T
    if lin.rows:
        w = torch.cat([w[a:b] for a, b in lin.rows])
    return w.contiguous()


def load_final_norm(index: WeightIndex, cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final norm's (weight, bias) as the forward uses them; bias None where it has none."""
    name = final_norm_tensor(cfg)
    bias = norm_bias_tensor(cfg, name)
    return load_norm(index, cfg, name, device), (index.get(bias, device=device) if bias else None)


def load_head(index: WeightIndex, cfg: ModelConfig, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The head's weight [V, H] as the model uses it: with ``norm_head`` (Index) each row
    L2-normalized, then rounded to the checkpoint's dtype, as ExLlamaV2 normalizes the loaded float16
    weight before it quantizes it."""
    name = head_spec(cfg, index).tensor
    if not cfg.norm_head:
        return index.get(name, dtype=dtype, device=device)
    w = F.normalize(index.get(name, device=device), dim=-1)
    return w.to(index.source_dtype(name)).to(dtype or torch.float32)


def load_layer_weights(index: WeightIndex, cfg: ModelConfig, i: int, part: str,
                       device=None, compact: bool = False, ahead: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The f32 tensors :func:`attention` (part "attn"), :func:`mlp` ("mlp") or :func:`parallel`
    ("parallel") needs for layer ``i``, keyed by short name: the norms (offset added), each
    linear's weight (sliced out of a fused source), "<short>.bias" if biased, "q_norm"/"k_norm"
    [head_dim] where the architecture has them, and an MoE router [E, H] (under its short name,
    "gate"). An MoE layer's expert linears are keyed "w1.<j>", "w3.<j>", "w2.<j>".
    ``compact``: the linears' weights in their source dtype where that is float16 or bfloat16
    (:meth:`WeightIndex.held_dtype`: half the memory; the forward widens them exactly, one product
    at a time). Once read, the tensors ``ahead`` names (by default those of the module a forward
    pass reads next, :func:`next_module_tensors`) are read from the disk in the background."""
    w: dict[str, torch.Tensor] = {}
    for key, name in block_norm_weights(cfg, i, part).items():
        w[key] = index.get(name, device=device) if key.endswith(".bias") else load_norm(index, cfg, name, device)
    router = router_tensor(cfg, i) if part == "mlp" else None
    if router:
        w[spec_of(cfg).moe_router] = index.get(router, device=device)
    for short, lin in block_linears(cfg, i, part).items():
        w[short] = load_linear(index, lin, index.held_dtype(lin.tensor, compact), device)
        if lin.bias:
            w[f"{short}.bias"] = index.get(lin.bias_tensor, device=device, rows=lin.rows)
    index.read_ahead(next_module_tensors(index, cfg, i, part) if ahead is None else ahead)
    return w


def layer_parts(cfg: ModelConfig) -> tuple[str, ...]:
    """The modules of one decoder layer, in order, by the part name that :func:`load_layer_weights`
    and :data:`BLOCKS` take: ("attn", "mlp"), or ("parallel",) where attention and MLP form one
    parallel block (Cohere)."""
    return ("parallel",) if spec_of(cfg).parallel else ("attn", "mlp")


def block_linears(cfg: ModelConfig, i: int, part: str) -> dict:
    """The linears of layer ``i``'s module ``part`` ("parallel": all of the layer's)."""
    return layer_linears(cfg, i, None if part == "parallel" else part)


def block_norm_weights(cfg: ModelConfig, i: int, part: str) -> dict[str, str]:
    """:func:`arch.norm_weights` of layer ``i``'s module ``part`` ("parallel": both branches')."""
    parts = ("attn", "mlp") if part == "parallel" else (part,)
    return {key: name for p in parts for key, name in norm_weights(cfg, i, p).items()}


def module_tensors(index: WeightIndex, cfg: ModelConfig, i: int, part: str) -> list[str]:
    """The names of the tensors :func:`load_layer_weights` reads for layer ``i``'s ``part``."""
    names = list(block_norm_weights(cfg, i, part).values())
    router = router_tensor(cfg, i) if part == "mlp" else None
    if router:
        names.append(router)
    for lin in block_linears(cfg, i, part).values():
        names.append(lin.tensor)
        if lin.bias:
            names.append(lin.bias_tensor)
    return names


def next_module_tensors(index: WeightIndex, cfg: ModelConfig, i: int, part: str) -> list[str]:
    """What a pass over the model reads after layer ``i``'s ``part``: the same layer's MLP after
    its attention, the next layer's attention after an MLP, the final norm and the head after the
    last layer."""
    if part == "attn":
        return module_tensors(index, cfg, i, "mlp")
    if i + 1 < cfg.num_layers:
        return module_tensors(index, cfg, i + 1, layer_parts(cfg)[0])
    bias = norm_bias_tensor(cfg, final_norm_tensor(cfg))
    return [final_norm_tensor(cfg)] + ([bias] if bias else []) + [head_spec(cfg, index).tensor]


def run_model(index: WeightIndex, cfg: ModelConfig, ids: torch.Tensor, device=None) -> torch.Tensor:
    """ids [B, L] -> f32 logits [B, L, V]: the whole model, one layer's weights in memory at a time.
    For checks and perplexity on small models; the converter drives the modules itself."""
    x = embed(ids, index.get(embedding_tensor(cfg), device=device), cfg.embed_scale,
              load_positions(index, cfg, device))
    rope = RotaryCache(cfg)
    for i in range(cfg.num_layers):
        for part in layer_parts(cfg):
            x, _ = BLOCKS[part](x, load_layer_weights(index, cfg, i, part, device), cfg, rope, layer=i)
    g, b = load_final_norm(index, cfg, device)
    x = final_norm(x, g, cfg, b)
    return logits(x, load_head(index, cfg, device), cfg)


# part name -> the module's forward (see layer_parts)
BLOCKS = {"attn": attention, "mlp": mlp, "parallel": parallel}
