"""The fields of an architecture (:class:`ArchSpec`): names of its tensors and how it computes.
The table of architectures is :data:`exl2conv.model.arch.ARCHS`."""

from __future__ import annotations

from dataclasses import dataclass

from ..qparams import ATTN_LINEARS, MLP_LINEARS


@dataclass(frozen=True)
class ArchSpec:
    """Names and behaviour of one architecture. Tensor names are HF names; per-layer ones are
    ``f"{prefix}{layers}.{i}.{suffix}"``.

    ``attn_norms`` / ``mlp_norms``: the module's norms, the pre-norm (which reads the residual
    stream) first, then a post-norm on the branch output where the architecture has one
    (Gemma2/3). ``fused``: internal linear name -> (HF fused tensor, part index); parts are
    q/k/v row ranges of ``qkv_proj`` or the gate/up halves of ``gate_up_proj``, as ExLlamaV2 slices
    them (its architecture.py's "fused_qkv" / "fused_mlp_12" keys; module.py,
    ExLlamaV2Module.load_weight_fused)."""

    name: str
    prefix: str = ""
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    attn_prefix: str = "self_attn"
    mlp_prefix: str = "mlp"
    attn_linears: tuple[str, ...] = ATTN_LINEARS
    # An MLP without "gate_proj" is ungated: down(act(up(x))) (Starcoder2).
    mlp_linears: tuple[str, ...] = MLP_LINEARS
    # The checkpoint's name of a linear where it differs from its short name, which stays the
    # name of its column in the measurement (Starcoder2's up_proj is "c_fc", down_proj "c_proj").
    linear_names: tuple[tuple[str, str], ...] = ()
    # Linears biased whatever the config says (e.g. Qwen2's q/k/v); config flags add more.
    always_biased: frozenset[str] = frozenset()
    act: str = "silu"
    # hidden_act / hidden_activation values accepted as meaning ``act`` (ExLlamaV2 never reads
    # them: the architecture fixes the activation; Gemma 1's configs say "gelu" for the tanh GELU,
    # as transformers computes it). Empty: ``act`` only.
    act_names: tuple[str, ...] = ()
    # "neox": dimension j pairs with j + rot/2; "gptj": 2j pairs with 2j + 1 (Glm4, Cohere). Over
    # the first rot = head_dim * partial_rotary_factor dimensions of each head. "none": no RoPE,
    # positions come from the learned table ``positions`` (GPTBigCode).
    rope_style: str = "neox"
    # The learned position table [max positions, hidden] added to the embeddings, where there is one.
    positions: str | None = None
    # Multi-query attention: one key/value head whatever config.json says (GPTBigCode, as ExLlamaV2).
    mqa: bool = False
    # The linears are stored [in, out] (GPT-2's Conv1D), transposed as they are read.
    transposed: bool = False
    # A prefix the checkpoint may put before every name (a GPT-2 saved by transformers says
    # "transformer.h.0...", the original checkpoint "h.0..."): ModelConfig.source_prefix holds the
    # one the checkpoint uses.
    optional_prefix: str = ""
    # "rms": RMSNorm; "layer": LayerNorm (mean subtracted), with a "<norm>.bias" tensor for every
    # norm where ``norm_bias`` (Orion).
    norm: str = "rms"
    norm_bias: bool = False
    # config.json keys of the norms' epsilon, the first present wins; none: ``default_eps`` always
    # (DBRX: ExLlamaV2 reads no key and uses torch's LayerNorm default, as the model does).
    eps_keys: tuple[str, ...] = ("rms_norm_eps",)
    default_eps: float = 1e-6
    # Where the checkpoint has no head tensor, the head is the embedding whatever
    # tie_word_embeddings says: ExLlamaV2's branches for these architectures give the head the
    # embedding as its fallback key (several of their configs leave tie_word_embeddings out).
    head_falls_back: bool = False
    # config.json's attention_bias biases q/k/v only, o_proj never (Glm4); else all four.
    bias_qkv_only: bool = False
    # MiniCPM: the logits are divided by hidden_size / dim_model_base.
    logit_scale_basedim: bool = False
    # InternLM2: the fused qkv tensor holds q, k and v per key/value head (:func:`_fused_rows`).
    qkv_interleaved: bool = False
    # Renaming from the checkpoint's names to the output's, as ExLlamaV2's keymap renames every
    # tensor it reads (exllamav2/architecture.py): each (old, new) replaces the text ``old`` in a
    # name, and an ``old`` starting with "$" only at the name's start; applied in order.
    keymap: tuple[tuple[str, str], ...] = ()
    # The config.json key ExLlamaV2 reads the norms' epsilon from; the output's config.json gets
    # it where the source's lacks it (Starcoder2's configs say norm_epsilon, ExLlamaV2 0.3.2
    # reads layer_norm_epsilon only). None: ExLlamaV2 reads no epsilon for the architecture (DBRX).
    exllamav2_eps_key: str | None = "rms_norm_eps"
    # Whether config.json's sliding_window applies (Mistral); Llama has no such field.
    sliding_window: bool = False
    # Per-head RMSNorm on q and k before RoPE (Qwen3, Gemma3).
    qk_norm: bool = False
    # What the q/k head norms compute over each head's dimensions: "rms", or "layer" (mean
    # subtracted: Cohere's use_qk_norm).
    head_norm: str = "rms"
    # Parallel decoder blocks (Cohere): attention and MLP both read the layer's one norm
    # (``attn_norms[0]``; ``mlp_norms`` is empty) and both add to the residual stream:
    # y = x + attn(n) + mlp(n). ExLlamaV2 runs such a layer as one module ("parallel_decoder").
    parallel: bool = False
    # Cohere2: the sliding-window layers rotate q and k, the global layers use no position
    # encoding at all (transformers' Cohere2Attention).
    rope_sliding_only: bool = False
    fused: tuple[tuple[str, str, int], ...] = ()
    # Gemma stores norm weights as w - 1; the norm multiplies by (w + offset).
    norm_offset: float = 0.0
    # Gemma multiplies the embeddings by sqrt(hidden_size).
    embed_scale: bool = False
    # Gemma2/3: per-layer sliding windows, attention scale from query_pre_attn_scalar, softcaps.
    gemma: bool = False
    # Gemma3ForConditionalGeneration: the language model's fields sit under "text_config" (the
    # vision-language models' too; Qwen2-VL's hub configs are flat, transformers 5 nests them).
    text_config: bool = False
    # What config.json's vision_config.model_type must say: ExLlamaV2 0.3.2 recognizes
    # LlavaForConditionalGeneration and Mistral3ForConditionalGeneration only with a Pixtral tower
    # (architecture.py, ExLlamaV2ArchParams.__init__); None: no condition.
    vision_model_type: str | None = None
    # Qwen2-VL's multimodal RoPE: config.json's rope type "mrope" with its mrope_section. For text
    # the three position sections are equal, so the rotation is plain RoPE (forward.rope_tables);
    # the sections are kept in the output's config.json for images (exllamav2_config.mrope_keys).
    mrope: bool = False
    # Rows of noise (measurement, quantization) appended to the built-in calibration set, standing
    # in for image embeddings (ExLlamaV2's standard_calib_noise; exl2conv.noise_rows).
    calib_noise: tuple[int, int] = (0, 0)
    # Source tensors outside the language model, copied verbatim after the head (ExLlamaV2's
    # conversion/compile.py, compile_model, its extra_tensors).
    extra_prefixes: tuple[str, ...] = ()
    # Mixture of experts (Mixtral): ``mlp_prefix`` holds a router ``moe_router`` [E, H] and experts
    # ``<moe_experts>.<j>.<w1|w3|w2>`` (gate, up, down); ``mlp_linears`` are the measurement's column
    # names (ExLlamaV2's w1/w3/w2 whatever the checkpoint calls them), ``linear_names`` the
    # checkpoint's names where they differ (Qwen3-MoE's gate_proj/up_proj/down_proj).
    moe: bool = False
    moe_router: str = "gate"
    moe_experts: str = "experts"
    # DBRX: each expert linear is stored once for all experts, ``<moe_experts>.<name>`` (no ".weight"),
    # [E * I, H]: expert j's w1/w3 are rows [j*I, (j+1)*I) and its w2 the same rows, stored [in, out]
    # (transposed). ExLlamaV2 slices them so (moe_mlp.py, ExLlamaV2MoEMLP.__init__, its f_key/f_beg/
    # f_end; module.py, load_weight_fused, which transposes a slice shaped [in, out]).
    fused_experts: bool = False
    # One warning line printed when a conversion of this architecture starts (ExLlamaV2's own caveat).
    caveat: str | None = None
    # The architecture whose layout the output takes, where ExLlamaV2 0.3.2 has no entry for this
    # one but runs it through another's (Gemma3ForCausalLM: as the language model of a
    # Gemma3ForConditionalGeneration with no vision tower); None: this one. ``out_prefix`` goes in
    # front of every output tensor name and measurement key (docs/format.md).
    out_arch: str | None = None
    out_prefix: str = ""

    def linear_name(self, short: str) -> str:
        """The checkpoint's name of linear ``short`` (``linear_names``)."""
        return dict(self.linear_names).get(short, short)
