"""config.json of the vision-language models in both forms: Qwen2-VL's hub configs are flat with
``rope_scaling {"type": "mrope"}``, transformers 5 nests the language model under text_config with
``rope_parameters``; both read as the same model, and the output's config.json (exllamav2_config)
leaves a hub config as it is and gives a transformers 5 one what ExLlamaV2 0.3.2 reads. And
transformers' in-memory names, mapped to the hub's (exl2conv.model.layouts)."""

import json

import pytest

from exl2conv.errors import Exl2Error
from exl2conv.model import arch as arch_mod
from exl2conv.model import exllamav2_config, load_config, layouts
from tests.tinyvl import MROPE

FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
          "norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_ids",
          "sliding_window", "max_position_embeddings")


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.tinymodel import make_tiny_hf
    return make_tiny_hf(tmp_path_factory.mktemp("qwen2vl") / "model", "Qwen2VLForConditionalGeneration", seed=3)


def as_hub_config(raw: dict) -> dict:
    """A transformers 5 Qwen2-VL config.json in the hub's flat form (Qwen/Qwen2-VL-7B-Instruct's)."""
    text = dict(raw["text_config"])
    params = text.pop("rope_parameters")
    flat = {k: v for k, v in raw.items() if k != "text_config"} | text
    flat |= {"model_type": "qwen2_vl", "rope_theta": params["rope_theta"],
             "rope_scaling": {"type": "mrope", "mrope_section": params["mrope_section"]}}
    vision = {k: v for k, v in raw["vision_config"].items() if k != "rope_parameters"}
    flat["vision_config"] = vision | {"spatial_patch_size": vision["patch_size"]}
    return flat


def test_the_hub_form_reads_as_the_transformers_5_form(nested, tmp_path):
    raw = json.loads((nested / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(as_hub_config(raw)))
    flat, ours = load_config(tmp_path), load_config(nested)
    assert {f: getattr(flat, f) for f in FIELDS} == {f: getattr(ours, f) for f in FIELDS}
    assert ours.rope_theta == 1_000_000.0 and ours.rope_scaling is None  # mrope is plain RoPE for text
    assert exllamav2_config.output_config(flat) is None  # ExLlamaV2 reads the hub's config as it is
    fixed = exllamav2_config.output_config(ours)
    assert fixed["text_config"]["rope_scaling"] == MROPE and fixed["text_config"]["rope_theta"] == 1_000_000.0


def test_a_rope_scaling_that_names_its_type_twice_is_written_once(nested, tmp_path):
    """ExLlamaV2 0.3.2 asserts on a rope_scaling with both "type" and "rope_type"."""
    hub = as_hub_config(json.loads((nested / "config.json").read_text()))
    hub["rope_scaling"]["rope_type"] = "default"
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert exllamav2_config.output_config(load_config(tmp_path))["rope_scaling"] == MROPE


def test_another_rope_type_is_still_refused(nested, tmp_path):
    hub = as_hub_config(json.loads((nested / "config.json").read_text()))
    hub["rope_scaling"] = {"type": "longrope", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    with pytest.raises(Exl2Error, match="rope_scaling.rope_type 'longrope' is not supported"):
        load_config(tmp_path)


@pytest.mark.parametrize("arch,pairs", [
    ("LlavaForConditionalGeneration", {"model.language_model.layers.0.self_attn": "language_model.model.layers.0.self_attn",
                                       "model.language_model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
                                       "lm_head": "language_model.lm_head",
                                       "model.vision_tower.ln_pre.weight": "vision_tower.ln_pre.weight",
                                       "model.multi_modal_projector.linear_1.bias": "multi_modal_projector.linear_1.bias"}),
    ("Qwen2VLForConditionalGeneration", {"model.language_model.layers.1.mlp": "model.layers.1.mlp",
                                         "model.language_model.norm.weight": "model.norm.weight", "lm_head": "lm_head",
                                         "model.visual.merger.mlp.0.weight": "visual.merger.mlp.0.weight"})])
def test_the_in_memory_names_are_written_as_the_hubs(arch, pairs):
    cfg = type("Cfg", (), {"arch": arch, "source_layout": layouts.IN_MEMORY})()
    spec = arch_mod.spec_of(cfg)
    assert (spec.prefix, spec.layers, spec.head) == ("", "model.language_model.layers", "lm_head")
    assert {name: arch_mod.output_name(cfg, name) for name in pairs} == pairs
    assert layouts.in_memory_fields(arch_mod.ARCHS["Gemma3ForCausalLM"]) is None  # no tower, no such layout
