"""Architectures beyond Llama (Qwen2, Qwen3, Phi-3, Gemma2, Gemma3, Mixtral): config parsing, the
tensor table, and the float32 forward compared with transformers module by module on tiny random
models that transformers itself builds and saves. Mixtral's MoE also has its Hessian inputs and
calibration-coverage rule checked on hand-routed states."""

import dataclasses
import json

import pytest
import torch

from exl2conv.errors import Exl2Error
from exl2conv.model import WeightIndex, expected_tensors, layer_linears, load_config
from exl2conv.model import arch as arch_mod
from exl2conv.model import forward as fw
from tests.tinymodel import (HF_ARCHS, REMOTE_ARCHS, logits_with_hooks, make_tiny_hf, make_tiny_llama,
                            make_tiny_mixtral, make_tiny_remote, trace_hooks, transformers_twin)


L = 24  # longer than the Gemma windows (8), so sliding layers differ from full ones


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} exceeds {tol:.0e} x scale {scale:.3g}"


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    return tf


@pytest.fixture(scope="module")
def models(tmp_path_factory, tf):
    root = tmp_path_factory.mktemp("archs")
    return {a: make_tiny_hf(root / a, a, dtype=torch.float32) for a in HF_ARCHS}


def _layers(model):
    if hasattr(model, "transformer"):  # GPTBigCode
        return model.transformer.h
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def hf_trace(model, arch: str, ids: torch.Tensor, llama_names: bool = False):
    """transformers' logits and, per layer: input x, the residual between attention and MLP
    (the input of the MLP's pre-norm), output y, and the Hessian inputs. ``llama_names``: the
    model is a Llama-named twin of ``arch`` (tests.tinymodel.transformers_twin)."""
    spec = arch_mod.ARCHS["LlamaForCausalLM" if llama_names else arch]
    attn_norm = spec.attn_norms[0]
    layers = _layers(model)
    trace = [dict() for _ in layers]
    hooks = []

    keep, keep_layer_input = trace_hooks(trace)

    for i, layer in enumerate(layers):
        hooks += [
            layer.register_forward_pre_hook(keep_layer_input(i), with_kwargs=True),
            layer.register_forward_hook(keep(i, "y")),
            getattr(layer, attn_norm).register_forward_hook(keep(i, "attn_post_norm")),
            getattr(getattr(layer, spec.attn_prefix), spec.linear_name("o_proj")).register_forward_hook(
                keep(i, "attn_output", True)),
            getattr(getattr(layer, spec.mlp_prefix), spec.linear_name("down_proj")).register_forward_hook(
                keep(i, "pre_down", True)),
        ]
        if spec.mlp_norms:  # a parallel block's MLP reads the attention's norm
            pre_mlp = getattr(layer, spec.mlp_norms[0])
            hooks += [pre_mlp.register_forward_hook(keep(i, "mid", True)),
                      pre_mlp.register_forward_hook(keep(i, "mlp_post_norm"))]
    return logits_with_hooks(model, ids, hooks), trace


def ids_for(vocab, rows=2, length=L, seed=1):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_forward_matches_transformers(tf, models, arch):
    path = models[arch]
    model = getattr(tf, arch).from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    check_forward(path, arch, model)


@pytest.mark.parametrize("arch", REMOTE_ARCHS)
def test_remote_code_forward_matches_its_transformers_twin(tf, tmp_path, arch):
    """Yi, Orion, Index and MiniCPM have no transformers class: each is checked against the
    transformers model that computes the same function (tests.tinymodel.transformers_twin)."""
    path = make_tiny_remote(tmp_path / arch, arch, dtype=torch.float32)
    check_forward(path, arch, transformers_twin(path, arch), llama_names=True)


def check_forward(path, arch: str, model, llama_names: bool = False) -> None:
    """Our float32 forward on ``path``, module by module and whole, against transformers'
    ``model`` (eager attention, float32)."""
    cfg = load_config(path)
    index = WeightIndex(path)
    index.check(expected_tensors(cfg))
    ids = ids_for(cfg.vocab_size)
    model.config._attn_implementation = "eager"
    ref_logits, trace = hf_trace(model, arch, ids, llama_names)

    x0 = fw.embed(ids, index.get(arch_mod.embedding_tensor(cfg)), cfg.embed_scale, fw.load_positions(index, cfg))
    close(x0, trace[0]["x"])
    rope = fw.RotaryCache(cfg)
    for i, t in enumerate(trace):
        if arch_mod.spec_of(cfg).parallel:
            y, inter = fw.parallel(t["x"], fw.load_layer_weights(index, cfg, i, "parallel"), cfg, rope, capture=True,
                                   layer=i)
            close(y, t["y"])
            close(inter["post_norm"], t["attn_post_norm"])
            close(inter["attn_output"], t["attn_output"])
            close(inter["pre_down"], t["pre_down"])
            continue
        y, inter = fw.attention(t["x"], fw.load_layer_weights(index, cfg, i, "attn"), cfg, rope, capture=True,
                                layer=i)
        close(y, t["mid"])
        close(inter["post_norm"], t["attn_post_norm"])
        close(inter["attn_output"], t["attn_output"])
        y, inter = fw.mlp(t["mid"], fw.load_layer_weights(index, cfg, i, "mlp"), cfg, capture=True)
        close(y, t["y"])
        close(inter["post_norm"], t["mlp_post_norm"])
        close(inter["pre_down"], t["pre_down"])
    close(fw.run_model(index, cfg, ids), ref_logits)


@pytest.mark.parametrize("arch, biased, extra", [
    ("Qwen2ForCausalLM", {"q_proj", "k_proj", "v_proj"}, []),
    ("Qwen3ForCausalLM", set(), ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]),
    ("Phi3ForCausalLM", set(), []),
    ("Gemma2ForCausalLM", set(), ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]),
    ("Gemma3ForCausalLM", set(), ["self_attn.q_norm.weight", "pre_feedforward_layernorm.weight"]),
    ("GemmaForCausalLM", set(), ["input_layernorm.weight", "post_attention_layernorm.weight"]),
    ("GraniteForCausalLM", set(), ["input_layernorm.weight"]),
    ("Glm4ForCausalLM", {"q_proj", "k_proj", "v_proj"}, ["post_self_attn_layernorm.weight", "post_mlp_layernorm.weight",
                                                         "mlp.gate_up_proj.weight"]),
    ("YiForCausalLM", set(), ["ln1.weight", "ln2.weight"]),
    ("OrionForCausalLM", set(), ["input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.bias"]),
    ("IndexForCausalLM", set(), ["input_layernorm.weight"]),
    ("MiniCPMForCausalLM", set(), ["input_layernorm.weight"]),
    ("Starcoder2ForCausalLM", {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"},
     ["input_layernorm.bias", "mlp.c_fc.weight", "mlp.c_proj.bias"]),
    ("InternLM2ForCausalLM", set(), ["attention.wqkv.weight", "attention.wo.weight", "attention_norm.weight",
                                     "feed_forward.w1.weight", "ffn_norm.weight"]),
    ("GPTBigCodeForCausalLM", {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"},
     ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "mlp.c_fc.weight", "mlp.c_proj.bias"]),
    ("GPT2LMHeadModel", {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"},
     ["ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "mlp.c_fc.weight", "mlp.c_proj.bias"]),
])
def test_tensor_table(models, remote_models, arch, biased, extra):
    cfg = load_config((models | remote_models)[arch])
    specs = layer_linears(cfg, 1)
    gated = ["gate_proj"] if "gate_proj" in arch_mod.spec_of(cfg).mlp_linears else []
    assert list(specs) == ["q_proj", "k_proj", "v_proj", "o_proj", *gated, "up_proj", "down_proj"]
    assert {s for s, sp in specs.items() if sp.bias} == biased
    names = expected_tensors(cfg)
    layers = arch_mod.spec_of(cfg).prefix + arch_mod.spec_of(cfg).layers
    for suffix in extra:
        assert f"{layers}.1.{suffix}" in names
    # the output's name: ExLlamaV2's, whatever the checkpoint calls it (InternLM2's attention.wqkv)
    assert arch_mod.output_name(cfg, specs["q_proj"].name).endswith("model.layers.1.self_attn.q_proj")


def test_phi3_fused_rows(models):
    """q/k/v are row ranges [0, 64), [64, 96), [96, 128) of qkv_proj; gate/up the halves of
    gate_up_proj, and slicing reads exactly those rows."""
    path = models["Phi3ForCausalLM"]
    cfg = load_config(path)
    specs = layer_linears(cfg, 0)
    assert [specs[s].rows for s in ("q_proj", "k_proj", "v_proj")] == [((0, 64),), ((64, 96),), ((96, 128),)]
    assert [specs[s].rows for s in ("gate_proj", "up_proj")] == [((0, 128),), ((128, 256),)]
    assert specs["k_proj"].tensor == "model.layers.0.self_attn.qkv_proj.weight"
    assert expected_tensors(cfg)["model.layers.0.mlp.gate_up_proj.weight"] == (256, 64)
    index = WeightIndex(path)
    full = index.get("model.layers.0.self_attn.qkv_proj.weight")
    w = fw.load_layer_weights(index, cfg, 0, "attn")
    assert torch.equal(torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]]), full)


def test_gemma_config_fields(models):
    g2 = load_config(models["Gemma2ForCausalLM"])
    assert g2.sliding_layers == (True, False) and g2.window(0) == 8 and g2.window(1) is None
    assert (g2.attn_softcap, g2.final_softcap) == (2.0, 3.0)
    assert g2.embed_scale == 8.0 and g2.norm_offset == 1.0
    g3 = load_config(models["Gemma3ForConditionalGeneration"])
    assert g3.hidden_size == 64 and g3.rope_local_theta == 10_000.0 and g3.rope_theta == 1e6
    assert g3.rope_scale == 2.0 and g3.tie_word_embeddings
    assert arch_mod.embedding_tensor(g3) == "language_model.model.embed_tokens.weight"
    assert arch_mod.extra_tensors(g3, WeightIndex(models["Gemma3ForConditionalGeneration"]))


def test_config_multipliers_and_rotary(models, remote_models):
    """The fields ExLlamaV2 reads for every architecture, as Granite, MiniCPM, Index and Glm4 set them."""
    granite = load_config(models["GraniteForCausalLM"])
    assert (granite.embed_scale, granite.residual_scale, granite.attn_scale, granite.logit_scale) == (3.0, 0.5, 0.2, 0.25)
    minicpm = load_config(remote_models["MiniCPMForCausalLM"])
    assert minicpm.embed_scale == 3.0 and minicpm.residual_scale == pytest.approx(1.4 / 2 ** 0.5)
    assert minicpm.logit_scale == 16 / 64 and minicpm.attn_scale is None
    assert load_config(remote_models["IndexForCausalLM"]).norm_head
    glm = load_config(models["Glm4ForCausalLM"])
    assert glm.partial_rotary_factor == 0.5 and glm.rotary_dim == 8
    assert fw.rope_tables(glm, 4)[0].shape == (4, 8)
    orion = load_config(remote_models["OrionForCausalLM"])
    assert arch_mod.norm_weights(orion, 0, "mlp") == {
        "post_attention_layernorm": "model.layers.0.post_attention_layernorm.weight",
        "post_attention_layernorm.bias": "model.layers.0.post_attention_layernorm.bias"}
    assert "model.norm.bias" in expected_tensors(orion)


def test_internlm2_names_and_wqkv_rows(remote_models):
    """InternLM2's tensors take ExLlamaV2's names in the output (its keymap), and q/k/v are read
    from wqkv's per-key/value-head blocks: 4 query heads of 16 over 2 KV heads, blocks of 64 rows."""
    cfg = load_config(remote_models["InternLM2ForCausalLM"])
    specs = layer_linears(cfg, 0)
    assert [specs[s].rows for s in ("q_proj", "k_proj", "v_proj")] == [
        ((0, 32), (64, 96)), ((32, 48), (96, 112)), ((48, 64), (112, 128))]
    names = {n: arch_mod.output_name(cfg, n) for n in (
        "model.tok_embeddings.weight", "output", "model.layers.0.attention.wo", "model.layers.0.attention.q_proj",
        "model.layers.0.attention_norm.weight", "model.layers.0.feed_forward.w1", "model.norm.weight")}
    assert list(names.values()) == [
        "model.embed_tokens.weight", "lm_head", "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.0.attention_norm.weight", "model.layers.0.feed_forward.w1", "model.norm.weight"]
    assert arch_mod.output_name(cfg, "model.layers.0.wo_extra.weight") == "model.layers.0.wo_extra.weight"


def test_gptbigcode_config_and_names(models):
    """GPTBigCode: the GPT-2 names of its config (n_embd, n_layer, n_head, n_inner, n_positions), one
    key/value head (multi-query) whatever num_key_value_heads says, no RoPE but learned positions,
    c_attn split into q [0, 64), k [64, 80), v [80, 96) with its bias likewise, and ExLlamaV2's
    names in the output."""
    cfg = load_config(models["GPTBigCodeForCausalLM"])
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (64, 2, 4, 1, 128)
    assert cfg.max_position_embeddings == 256 and arch_mod.position_tensor(cfg) == "transformer.wpe.weight"
    specs = layer_linears(cfg, 1)
    assert [specs[s].rows for s in ("q_proj", "k_proj", "v_proj")] == [((0, 64),), ((64, 80),), ((80, 96),)]
    assert specs["k_proj"].bias_tensor == "transformer.h.1.attn.c_attn.bias"
    names = [arch_mod.output_name(cfg, n) for n in (
        "transformer.wte.weight", "transformer.wpe", "transformer.h.1.ln_1.weight", specs["q_proj"].name,
        specs["o_proj"].name, specs["up_proj"].name, specs["down_proj"].name, "transformer.ln_f.bias", "lm_head")]
    assert names == ["model.embed_tokens.weight", "model.wpe", "model.layers.1.ln_1.weight",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.c_fc",
                     "model.layers.1.mlp.c_proj", "model.norm.bias", "lm_head"]


def test_gpt2_in_both_checkpoint_layouts(tmp_path, models):
    """A GPT-2 saved by transformers names its tensors "transformer.h.0...", the original
    checkpoint "h.0..." (the only one ExLlamaV2 0.3.2 itself converts): both read the same, with
    Conv1D weights [in, out] transposed, n_inner null meaning 4 x hidden, and ExLlamaV2's names out."""
    from safetensors.torch import load_file, save_file

    src = models["GPT2LMHeadModel"]
    bare = tmp_path / "gpt2"
    bare.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (bare / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    assert all(n.startswith("transformer.") for n in tensors if n != "lm_head.weight")
    save_file({n.removeprefix("transformer."): t for n, t in tensors.items()}, str(bare / "model.safetensors"))
    cfg, cfg_bare = load_config(src), load_config(bare)
    assert (cfg.source_prefix, cfg_bare.source_prefix) == ("transformer.", "")
    ids = ids_for(cfg.vocab_size)
    assert torch.equal(fw.run_model(WeightIndex(src), cfg, ids), fw.run_model(WeightIndex(bare), cfg_bare, ids))
    for c in (cfg, cfg_bare):
        specs = layer_linears(c, 0)
        assert specs["q_proj"].transposed and specs["q_proj"].rows == ((0, 64),)
        assert [arch_mod.output_name(c, specs[s].name) for s in ("q_proj", "o_proj", "down_proj")] == [
            "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.c_proj"]
        assert arch_mod.output_name(c, arch_mod.head_spec(c, WeightIndex(c.model_dir)).name) == "lm_head"
    raw = json.loads((bare / "config.json").read_text())
    raw["n_inner"] = None
    raw.pop("intermediate_size", None)
    (bare / "config.json").write_text(json.dumps(raw))
    assert load_config(bare).intermediate_size == 4 * 64


def test_gptbigcode_without_multi_query_is_refused(tmp_path, models):
    raw = json.loads((models["GPTBigCodeForCausalLM"] / "config.json").read_text())
    path = make_tiny_hf(tmp_path / "m", "GPTBigCodeForCausalLM")
    (path / "config.json").write_text(json.dumps(raw | {"multi_query": False}))
    with pytest.raises(Exl2Error, match="multi_query is false"):
        load_config(path)


def test_internlm2_with_biases_is_refused(tmp_path):
    path = make_tiny_remote(tmp_path / "m", "InternLM2ForCausalLM")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | {"bias": True}))
    with pytest.raises(Exl2Error, match="field 'bias' is true"):
        load_config(path)


def test_gemma1_config_as_google_ships_it(tmp_path, models):
    """Gemma 1's config.json says hidden_act "gelu" (transformers runs the tanh GELU all the same) and
    leaves tie_word_embeddings out; ExLlamaV2 takes the head from the embedding then."""
    raw = json.loads((models["GemmaForCausalLM"] / "config.json").read_text())
    raw.pop("tie_word_embeddings", None)
    raw["hidden_act"] = "gelu"
    path = make_tiny_hf(tmp_path / "g", "GemmaForCausalLM")
    (path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(path)
    assert not cfg.tie_word_embeddings
    assert arch_mod.head_spec(cfg, WeightIndex(path)).tensor == "model.embed_tokens.weight"
    raw["hidden_act"] = "silu"
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(Exl2Error, match="hidden_act is 'silu'"):
        load_config(path)


def test_gemma3_legacy_config_fields(tmp_path, models):
    """A config.json as Google ships it: rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern instead of transformers 5's rope_parameters and layer_types."""
    src = models["Gemma3ForCausalLM"]
    raw = json.loads((src / "config.json").read_text())
    for k in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        raw.pop(k, None)
    raw |= {"rope_theta": 1e6, "rope_local_base_freq": 20000.0, "sliding_window_pattern": 2,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path)
    assert cfg.sliding_layers == (True, False)
    assert cfg.rope_local_theta == 20000.0 and cfg.rope_scale == 4.0


def test_unknown_architecture_is_refused_with_the_list(tmp_path):
    path = make_tiny_llama(tmp_path / "m", extra_config={"architectures": ["FalconForCausalLM"]})
    with pytest.raises(Exl2Error) as e:
        load_config(path)
    msg = str(e.value)
    assert "FalconForCausalLM" in msg
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                 "Gemma2ForCausalLM", "Gemma3ForConditionalGeneration", "MixtralForCausalLM"):
        assert name in msg


@pytest.fixture(scope="module")
def remote_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    return {a: make_tiny_remote(root / a, a, dtype=torch.float32) for a in REMOTE_ARCHS}


@pytest.mark.parametrize("arch, change, spec_change", [
    ("Gemma2ForCausalLM", {"attn_softcap": None}, {}),
    ("Gemma2ForCausalLM", {"final_softcap": None}, {}),
    ("Gemma2ForCausalLM", {"sliding_layers": (False, False)}, {}),
    ("Gemma2ForCausalLM", {"attn_scale": None}, {}),
    ("Gemma3ForCausalLM", {"rope_local_theta": None}, {}),
    ("GemmaForCausalLM", {}, {"norm_offset": 0.0}),
    ("GemmaForCausalLM", {}, {"embed_scale": False}),
    ("GraniteForCausalLM", {"embedding_multiplier": 1.0}, {}),
    ("GraniteForCausalLM", {"residual_scale": 1.0}, {}),
    ("GraniteForCausalLM", {"attn_scale": None}, {}),
    ("GraniteForCausalLM", {"logit_scale": 1.0}, {}),
    ("Glm4ForCausalLM", {"partial_rotary_factor": 1.0}, {}),
    ("Glm4ForCausalLM", {}, {"rope_style": "neox"}),
    ("Glm4ForCausalLM", {}, {"attn_norms": ("input_layernorm",)}),
    ("OrionForCausalLM", {}, {"norm": "rms"}),
    ("OrionForCausalLM", {}, {"norm_bias": False}),
    ("IndexForCausalLM", {"norm_head": False}, {}),
    ("MiniCPMForCausalLM", {"logit_scale": 1.0}, {}),
    ("Starcoder2ForCausalLM", {}, {"norm_bias": False}),
    ("InternLM2ForCausalLM", {}, {"qkv_interleaved": False}),
    ("GPTBigCodeForCausalLM", {}, {"positions": None}),
    ("GPT2LMHeadModel", {}, {"positions": None}),
    ("CohereForCausalLM", {"use_qk_norm": False}, {}),
    ("CohereForCausalLM", {"logit_scale": 1.0}, {}),
    ("CohereForCausalLM", {}, {"rope_style": "neox"}),
    ("CohereForCausalLM", {}, {"norm": "rms"}),
    ("Cohere2ForCausalLM", {}, {"rope_sliding_only": False}),
])
def test_each_architecture_feature_changes_the_result(models, remote_models, monkeypatch, arch, change, spec_change):
    """Matching transformers proves a feature right only if leaving it out changes the logits."""
    path = (models | remote_models)[arch]
    cfg = load_config(path)
    index = WeightIndex(path)
    ids = ids_for(cfg.vocab_size)
    full = fw.run_model(index, cfg, ids)
    monkeypatch.setitem(arch_mod.ARCHS, arch, dataclasses.replace(arch_mod.ARCHS[arch], **spec_change))
    without = fw.run_model(index, dataclasses.replace(cfg, **change), ids)
    assert (full - without).abs().max() > 1e-3


# -- Mixtral (mixture of experts) -----------------------------------------------------------------

MIXTRAL = "MixtralForCausalLM"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tf):
    """Float32, with a sliding window (8) shorter than the test rows (L = 24)."""
    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral") / "m", dtype=torch.float32,
                             extra_config={"sliding_window": 8})


def hf_moe_trace(model, ids: torch.Tensor):
    """transformers' logits and, per layer: input x, the residual before the MoE block (mid), the
    MoE post-norm, the router's top-k weights and experts, and the layer output y."""
    trace = [dict() for _ in model.model.layers]
    hooks = []

    keep, keep_layer_input = trace_hooks(trace)

    def keep_router(i):
        def hook(_mod, _args, out):
            trace[i]["route_weights"], trace[i]["route_experts"] = out[1].detach().clone(), out[2].clone()
        return hook

    for i, layer in enumerate(model.model.layers):
        hooks += [
            layer.register_forward_pre_hook(keep_layer_input(i), with_kwargs=True),
            layer.register_forward_hook(keep(i, "y")),
            layer.post_attention_layernorm.register_forward_hook(keep(i, "mid", True)),
            layer.post_attention_layernorm.register_forward_hook(keep(i, "post_norm")),
            layer.mlp.gate.register_forward_hook(keep_router(i)),
        ]
    return logits_with_hooks(model, ids, hooks), trace


def test_mixtral_forward_matches_transformers(tf, mixtral):
    cfg = load_config(mixtral)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.sliding_window) == (4, 2, 8)
    index = WeightIndex(mixtral)
    index.check(expected_tensors(cfg))
    ids = ids_for(cfg.vocab_size)
    model = tf.MixtralForCausalLM.from_pretrained(mixtral, attn_implementation="eager",
                                                  dtype=torch.float32).eval()
    ref_logits, trace = hf_moe_trace(model, ids)
    rope = fw.RotaryCache(cfg)
    for i, t in enumerate(trace):
        y, _ = fw.attention(t["x"], fw.load_layer_weights(index, cfg, i, "attn"), cfg, rope, layer=i)
        close(y, t["mid"])
        w = fw.load_layer_weights(index, cfg, i, "mlp")
        y, inter = fw.mlp(t["mid"], w, cfg, capture=True)
        close(y, t["y"])
        close(inter["post_norm"], t["post_norm"])
        weights, experts = fw.route(inter["post_norm"].reshape(-1, cfg.hidden_size), w["gate"], 2)
        assert torch.equal(experts, t["route_experts"].reshape(experts.shape))
        close(weights, t["route_weights"].reshape(weights.shape))
        # every expert is used somewhere, so each w2 Hessian gets data in this test
        assert (inter[fw.EXPERT_TOKENS].sum(0) > 0).all()
    close(fw.run_model(index, cfg, ids), ref_logits)


def test_mixtral_window_and_routing_change_the_result(mixtral):
    """Matching transformers proves the window and top-k right only if they matter here."""
    cfg = load_config(mixtral)
    index = WeightIndex(mixtral)
    ids = ids_for(cfg.vocab_size)
    full = fw.run_model(index, cfg, ids)
    for change in ({"sliding_window": None}, {"num_experts_per_tok": 1}):
        assert (full - fw.run_model(index, dataclasses.replace(cfg, **change), ids)).abs().max() > 1e-3


def test_mixtral_tensor_table(mixtral):
    from exl2conv.layers import module_list

    cfg = load_config(mixtral)
    specs = layer_linears(cfg, 1, "mlp")
    assert list(specs) == [f"{s}.{j}" for j in range(4) for s in ("w1", "w3", "w2")]
    w2 = specs["w2.3"]
    assert w2.name == "model.layers.1.block_sparse_moe.experts.3.w2"
    assert (w2.short, w2.expert, w2.in_features, w2.out_features, w2.bias) == ("w2", 3, 96, 64, False)
    assert w2.hessian_input == "pre_down.3"
    assert {specs[f"{s}.{j}"].hessian_input for j in range(4) for s in ("w1", "w3")} == {"moe_post_norm"}
    assert arch_mod.router_tensor(cfg, 1) == "model.layers.1.block_sparse_moe.gate.weight"
    assert expected_tensors(cfg)["model.layers.1.block_sparse_moe.gate.weight"] == (4, 64)
    assert arch_mod.norm_tensors(cfg, 1, "mlp") == ["model.layers.1.post_attention_layernorm.weight"]
    keys = [m.meas_key for m in module_list(cfg.num_layers, moe=True)]
    assert keys[1:3] == ["model.layers.0.self_attn", "model.layers.0.block_sparse_moe"]
    assert keys[-2:] == ["model.norm.norm", "lm_head.linear"]


@pytest.mark.parametrize("change, field", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok (5) exceeds num_local_experts (4)"),
    ({"num_local_experts": None}, "'num_local_experts' is missing"),
    ({"num_experts_per_tok": 0}, "'num_experts_per_tok' must be a positive integer"),
])
def test_mixtral_config_checks(tmp_path, mixtral, change, field):
    raw = json.loads((mixtral / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | change))
    with pytest.raises(Exl2Error) as e:
        load_config(tmp_path)
    assert field in str(e.value) and "config.json" in str(e.value)


def _routed_layer(cfg, length: int = 20):
    """A hand-made MoE layer (hidden 8, 5 experts, top 2) whose router sends each token to the two
    experts whose hidden channels the token lights up, and states [3, length, 8] that route:
    row 0 every token to experts (0, 1); row 1 to (1, 2); row 2 token 0 to (0, 3), the rest to
    (1, 2). Expert 4 is never used. Returns (cfg, weights, states)."""
    g = torch.Generator().manual_seed(0)
    hidden, inter = 8, 16
    cfg = dataclasses.replace(cfg, num_experts=5, num_experts_per_tok=2, hidden_size=hidden,
                              intermediate_size=inter)
    w = {"post_attention_layernorm": torch.ones(hidden),
         "gate": 20.0 * torch.eye(5, hidden)}
    for j in range(5):
        w[f"w1.{j}"] = torch.randn(inter, hidden, generator=g)
        w[f"w3.{j}"] = torch.randn(inter, hidden, generator=g)
        w[f"w2.{j}"] = torch.randn(hidden, inter, generator=g)
    states = 0.01 * torch.randn(3, length, hidden, generator=g)
    states[0, :, [0, 1]] += 1.0
    states[1, :, [1, 2]] += 1.0
    states[2, 1:, [1, 2]] += 1.0
    states[2, 0, [0, 3]] += 1.0
    return cfg, w, states


def test_moe_hessians_follow_exllamav2(mixtral):
    """w1.0's Hessian (shared by every w1 and w3) sums the post-norm of the rows in which expert 0
    got a token and counts those rows only; w2.j sums expert j's pre_down over its own tokens,
    counting the rows it was used in; an unused expert's Hessian is the identity (spec 3.2, 5.1)."""
    from exl2conv.layers import ModuleRun, run_block
    from exl2conv.measure import hessians_for
    from exl2conv.moe import ExpertCoverage

    cfg, w, states = _routed_layer(load_config(mixtral))
    hess = hessians_for(layer_linears(cfg, 0, "mlp"), "cpu")
    assert sorted(hess) == ["moe_post_norm"] + [f"pre_down.{j}" for j in range(5)]
    cov = ExpertCoverage("layer", 5, states.shape[1])
    run_block(ModuleRun("mlp", w, layer_linears(cfg, 0, "mlp"), cfg, None, 2, 0), states,
              hessians={**hess, fw.EXPERT_TOKENS: cov})

    n = fw.rms_norm(states, w["post_attention_layernorm"], cfg.norm_eps)
    shared = hess["moe_post_norm"]
    assert shared.rows == 2  # rows 0 and 2
    close(shared.h, n[0].T @ n[0] + n[2].T @ n[2], 1e-5)

    def pre_down(j, x):
        return torch.nn.functional.silu(x @ w[f"w1.{j}"].T) * (x @ w[f"w3.{j}"].T)

    tokens = {0: [(0, slice(None)), (2, slice(0, 1))], 3: [(2, slice(0, 1))],
              2: [(1, slice(None)), (2, slice(1, None))]}
    for j, parts in tokens.items():
        want = sum(pre_down(j, n[r, t]).T @ pre_down(j, n[r, t]) for r, t in parts)
        assert hess[f"pre_down.{j}"].rows == len(parts)
        close(hess[f"pre_down.{j}"].h, want, 1e-5)
    assert hess["pre_down.1"].rows == 3
    assert hess["pre_down.4"].rows == 0
    assert torch.equal(hess["pre_down.4"].normalized(), torch.eye(16))

    # coverage: expert 0 has no token in row 1 and 1 of 20 (< 2) in row 2; expert 2 none in row 0;
    # expert 3 has 0, 0, 1; with 3 rows, one uncalibrated row (33%) is already too many
    assert cov.rows == 3 and cov.tokens.tolist() == [21, 59, 39, 1, 0]
    assert cov.uncalibrated.tolist() == [2, 0, 1, 3, 3]
    assert cov.flagged() == [0, 2, 3, 4]


def test_moe_coverage_rule():
    """Uncalibrated in a row: no token, or fewer than a tenth of the row's tokens (strictly);
    warned: uncalibrated in more than 20% of the rows (strictly). ExLlamaV2 measure.py/quantize.py."""
    from exl2conv.moe import ExpertCoverage, uncalibrated

    length = 30
    counts = torch.tensor([[0, 2, 3, 30]])
    assert uncalibrated(counts, length).tolist() == [[True, True, False, False]]
    assert uncalibrated(torch.tensor([[4, 5]]), 50).tolist() == [[True, False]]

    # 10 rows; expert 0 uncalibrated in 2 (20%: fine), expert 1 in 3 (30%: warned), expert 2 never
    cov = ExpertCoverage("model.layers.7.block_sparse_moe", 3, length)
    rows = torch.full((10, 3), 10)
    rows[:2, 0] = 2
    rows[:3, 1] = 0
    cov.add_rows(rows[:4])
    cov.add_rows(rows[4:])
    assert cov.rows == 10 and cov.uncalibrated.tolist() == [2, 3, 0]
    assert cov.flagged() == [1]
    msg = cov.warning()
    assert msg.count("\n") == 0
    assert msg.startswith("model.layers.7.block_sparse_moe: expert 1 got under 1/10 of a row's tokens")
    assert "(3/10 rows)" in msg and "more than 20%" in msg
    assert "calibration tokens routed to experts 0..2" in cov.summary()

    fine = ExpertCoverage("x", 3, length)
    fine.add_rows(torch.full((5, 3), 3))
    assert fine.warning() is None and fine.flagged() == []


def test_moe_coverage_is_reported(capsys):
    from exl2conv.moe import ExpertCoverage, report_coverage
    from exl2conv.report import Reporter

    cov = ExpertCoverage("model.layers.0.block_sparse_moe", 2, 10)
    cov.add_rows(torch.tensor([[10, 0], [10, 0]]))
    report_coverage(Reporter(), cov)
    out, err = capsys.readouterr()
    assert "model.layers.0.block_sparse_moe: calibration tokens routed to experts 0..1: 100% 0%" in out
    assert len(err.strip().splitlines()) == 1 and "expert 1 got under 1/10" in err
