"""Architectures beyond Llama (Qwen2, Qwen3, Phi-3, Gemma2, Gemma3): config parsing, the tensor
table, and the float32 forward compared with transformers module by module on tiny random models
that transformers itself builds and saves."""

import json
import sys
from pathlib import Path

import pytest
import torch

from exl2conv.errors import Exl2Error
from exl2conv.model import WeightIndex, expected_tensors, layer_linears, load_config
from exl2conv.model import arch as arch_mod
from exl2conv.model import forward as fw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinymodel import HF_ARCHS, make_tiny_hf, make_tiny_llama  # noqa: E402

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
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def hf_trace(model, arch: str, ids: torch.Tensor):
    """transformers' logits and, per layer: input x, the residual between attention and MLP
    (the input of the MLP's pre-norm), output y, and the Hessian inputs."""
    spec = arch_mod.ARCHS[arch]
    layers = _layers(model)
    trace = [dict() for _ in layers]
    hooks = []

    def keep(i, key, use_input=False):
        def hook(_mod, args, out):
            t = args[0] if use_input else (out[0] if isinstance(out, tuple) else out)
            trace[i][key] = t.detach().clone()
        return hook

    def keep_layer_input(i):
        def hook(_mod, args, kwargs):
            trace[i]["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    for i, layer in enumerate(layers):
        pre_attn, pre_mlp = getattr(layer, spec.attn_norms[0]), getattr(layer, spec.mlp_norms[0])
        hooks += [
            layer.register_forward_pre_hook(keep_layer_input(i), with_kwargs=True),
            layer.register_forward_hook(keep(i, "y")),
            pre_attn.register_forward_hook(keep(i, "attn_post_norm")),
            layer.self_attn.o_proj.register_forward_hook(keep(i, "attn_output", True)),
            pre_mlp.register_forward_hook(keep(i, "mid", True)),
            pre_mlp.register_forward_hook(keep(i, "mlp_post_norm")),
            layer.mlp.down_proj.register_forward_hook(keep(i, "pre_down", True)),
        ]
    try:
        with torch.no_grad():
            out = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return out, trace


def ids_for(vocab, rows=2, length=L, seed=1):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_forward_matches_transformers(tf, models, arch):
    path = models[arch]
    cfg = load_config(path)
    index = WeightIndex(path)
    index.check(expected_tensors(cfg))
    ids = ids_for(cfg.vocab_size)
    model = getattr(tf, arch).from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    ref_logits, trace = hf_trace(model, arch, ids)

    x0 = fw.embed(ids, index.get(arch_mod.embedding_tensor(cfg)), cfg.embed_scale)
    close(x0, trace[0]["x"])
    rope = fw.RotaryCache(cfg)
    for i, t in enumerate(trace):
        y, inter = fw.attention(t["x"], fw.load_layer_weights(index, cfg, i, "attn"), cfg, rope, capture=True)
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
])
def test_tensor_table(models, arch, biased, extra):
    cfg = load_config(models[arch])
    specs = layer_linears(cfg, 1)
    assert list(specs) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert {s for s, sp in specs.items() if sp.bias} == biased
    names = expected_tensors(cfg)
    for suffix in extra:
        assert f"model.layers.1.{suffix}" in names
    assert specs["q_proj"].name == "model.layers.1.self_attn.q_proj"


def test_phi3_fused_rows(models):
    """q/k/v are row ranges [0, 64), [64, 96), [96, 128) of qkv_proj; gate/up the halves of
    gate_up_proj, and slicing reads exactly those rows."""
    path = models["Phi3ForCausalLM"]
    cfg = load_config(path)
    specs = layer_linears(cfg, 0)
    assert [specs[s].rows for s in ("q_proj", "k_proj", "v_proj")] == [(0, 64), (64, 96), (96, 128)]
    assert [specs[s].rows for s in ("gate_proj", "up_proj")] == [(0, 128), (128, 256)]
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
                 "Gemma2ForCausalLM", "Gemma3ForConditionalGeneration"):
        assert name in msg


@pytest.mark.parametrize("arch, change", [
    ("Gemma2ForCausalLM", {"attn_softcap": None}),
    ("Gemma2ForCausalLM", {"final_softcap": None}),
    ("Gemma2ForCausalLM", {"sliding_layers": (False, False)}),
    ("Gemma2ForCausalLM", {"attn_scale": None}),
    ("Gemma3ForCausalLM", {"rope_local_theta": None}),
])
def test_each_gemma_feature_changes_the_result(models, arch, change):
    """Matching transformers proves a feature right only if leaving it out changes the logits."""
    import dataclasses

    path = models[arch]
    cfg = load_config(path)
    index = WeightIndex(path)
    ids = ids_for(cfg.vocab_size)
    full = fw.run_model(index, cfg, ids)
    without = fw.run_model(index, dataclasses.replace(cfg, **change), ids)
    assert (full - without).abs().max() > 1e-3
