"""Architecture table: which HF tensors make up a model and how each linear is shaped.

Each supported ``architectures[0]`` string maps to an :class:`ArchSpec`, plain data. A new
Llama-like architecture is a new table entry; one that computes differently (Gemma's norm
offset, Phi-3's fused sources, Mixtral's experts) adds a field here and a small hook in
:mod:`exl2conv.model.forward` that reads it.

Shapes follow HF: a linear's weight is ``[out_features, in_features]``. ExLlamaV2 works on
the transpose ``[K, N]`` with K = in_features and N = out_features padded to a multiple of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import Exl2Error

if TYPE_CHECKING:  # config imports this module; a runtime import would be circular
    from .config import ModelConfig
    from .weights import WeightIndex

PAD = 32


def ceil32(n: int) -> int:
    return -(-n // PAD) * PAD


@dataclass(frozen=True)
class ArchSpec:
    """Names and behaviour of one architecture. Tensor names are HF names; per-layer ones are
    ``f"{layers}.{i}.{suffix}"``."""

    name: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    norm_1: str = "input_layernorm"
    norm_2: str = "post_attention_layernorm"
    attn_prefix: str = "self_attn"
    mlp_prefix: str = "mlp"
    attn_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # Linears biased whatever the config says (e.g. Qwen2's q/k/v); config flags add more.
    always_biased: frozenset[str] = frozenset()
    act: str = "silu"
    rope_style: str = "neox"
    # Whether config.json's sliding_window applies (Mistral); Llama has no such field.
    sliding_window: bool = False


ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM"),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", sliding_window=True),
}

ATTN_BIAS_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_BIAS_LINEARS = ("gate_proj", "up_proj", "down_proj")

# (in_features, out_features) of each linear, from the config.
_SHAPES: dict[str, Callable[["ModelConfig"], tuple[int, int]]] = {
    "q_proj": lambda c: (c.hidden_size, c.num_heads * c.head_dim),
    "k_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
    "v_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
    "o_proj": lambda c: (c.num_heads * c.head_dim, c.hidden_size),
    "gate_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "up_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "down_proj": lambda c: (c.intermediate_size, c.hidden_size),
}

# Which intermediate of the forward pass feeds each linear: the Hessian input (spec 3.2).
HESSIAN_INPUT: dict[str, str] = {
    "q_proj": "post_norm",
    "k_proj": "post_norm",
    "v_proj": "post_norm",
    "o_proj": "attn_output",
    "gate_proj": "post_norm",
    "up_proj": "post_norm",
    "down_proj": "pre_down",
}


@dataclass(frozen=True)
class LinearSpec:
    """One linear to quantize.

    ``name`` is the output key (``model.layers.3.self_attn.q_proj``, or ``lm_head``);
    ``tensor`` the HF weight it is read from (differs for a tied head). K = ``in_features``,
    N = ``padded_out`` = ceil32(``out_features``). ``part`` is "attn", "mlp" or "head";
    ``hessian_input`` names the forward intermediate that feeds it."""

    name: str
    short: str
    tensor: str
    in_features: int
    out_features: int
    padded_out: int
    bias: bool
    part: str
    hessian_input: str

    @property
    def bias_tensor(self) -> str | None:
        return f"{self.name}.bias" if self.bias else None


def spec_of(cfg: "ModelConfig") -> ArchSpec:
    try:
        return ARCHS[cfg.arch]
    except KeyError:
        raise Exl2Error(
            f"architecture {cfg.arch!r} is not supported; supported: {', '.join(ARCHS)}"
        ) from None


def layer_prefix(cfg: "ModelConfig", i: int) -> str:
    return f"{spec_of(cfg).layers}.{i}"


def is_biased(cfg: "ModelConfig", short: str) -> bool:
    spec = spec_of(cfg)
    return (
        short in spec.always_biased
        or (cfg.attention_bias and short in ATTN_BIAS_LINEARS)
        or (cfg.mlp_bias and short in MLP_BIAS_LINEARS)
    )


def _linear(cfg: "ModelConfig", i: int, part: str, prefix: str, short: str) -> LinearSpec:
    k, n = _SHAPES[short](cfg)
    name = f"{layer_prefix(cfg, i)}.{prefix}.{short}"
    return LinearSpec(
        name=name, short=short, tensor=f"{name}.weight", in_features=k, out_features=n,
        padded_out=ceil32(n), bias=is_biased(cfg, short), part=part,
        hessian_input=HESSIAN_INPUT[short],
    )


def layer_linears(cfg: "ModelConfig", i: int, part: str | None = None) -> dict[str, LinearSpec]:
    """Linears of layer ``i`` keyed by short name, in ExLlamaV2's order (q, k, v, o, gate,
    up, down). ``part`` ("attn" or "mlp") keeps one group only."""
    spec = spec_of(cfg)
    groups = (("attn", spec.attn_prefix, spec.attn_linears), ("mlp", spec.mlp_prefix, spec.mlp_linears))
    out: dict[str, LinearSpec] = {}
    for group, prefix, shorts in groups:
        if part is None or part == group:
            for short in shorts:
                out[short] = _linear(cfg, i, group, prefix, short)
    if part is not None and not out:
        raise ValueError(f"part must be 'attn' or 'mlp', not {part!r}")
    return out


def head_spec(cfg: "ModelConfig", weights: "WeightIndex") -> LinearSpec:
    """The head, always keyed ``lm_head``. It reads ``lm_head.weight`` when the checkpoint has
    one and otherwise, for tied configs, the embedding (spec 8.1). Its row count comes from the
    tensor itself, so N is that padded to 32."""
    spec = spec_of(cfg)
    own = f"{spec.head}.weight"
    if weights.has(own):
        tensor = own
    elif cfg.tie_word_embeddings:
        tensor = f"{spec.embed}.weight"
    else:
        raise Exl2Error(
            f"{own} is missing from the safetensors files in {weights.model_dir} and config.json "
            f"does not set tie_word_embeddings; the head has no weights"
        )
    rows, k = weights.shape(tensor)
    return LinearSpec(
        name=spec.head, short="lm_head", tensor=tensor, in_features=k, out_features=rows,
        padded_out=ceil32(rows), bias=False, part="head", hessian_input="final_norm",
    )


def unquantized_tensors(cfg: "ModelConfig", i: int) -> list[str]:
    """HF names of the tensors of layer ``i`` that are copied as FP16 (its norms, spec 6.8),
    in output order: attention norm first, then MLP norm."""
    spec = spec_of(cfg)
    p = layer_prefix(cfg, i)
    return [f"{p}.{spec.norm_1}.weight", f"{p}.{spec.norm_2}.weight"]


def embedding_tensor(cfg: "ModelConfig") -> str:
    return f"{spec_of(cfg).embed}.weight"


def final_norm_tensor(cfg: "ModelConfig") -> str:
    return f"{spec_of(cfg).final_norm}.weight"


def expected_tensors(cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
    """Every HF tensor the conversion reads, with its shape, in module order. The head is
    listed only when the config does not tie it to the embedding."""
    spec = spec_of(cfg)
    h = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {embedding_tensor(cfg): (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        for part, norm in zip(("attn", "mlp"), unquantized_tensors(cfg, i)):
            out[norm] = (h,)
            for lin in layer_linears(cfg, i, part).values():
                out[lin.tensor] = (lin.out_features, lin.in_features)
                if lin.bias:
                    out[lin.bias_tensor] = (lin.out_features,)
    out[final_norm_tensor(cfg)] = (h,)
    if not cfg.tie_word_embeddings:
        out[f"{spec.head}.weight"] = (cfg.vocab_size, h)
    return out
