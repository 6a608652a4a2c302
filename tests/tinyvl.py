"""Tiny vision-language models for tests: the transformers config of each architecture ExLlamaV2
0.3.2 converts with a vision tower (Qwen2-VL, Qwen2.5-VL, Llava with Pixtral, Mistral 3), and the
image processor settings a real checkpoint ships beside it, which ExLlamaV2 reads at load
(exllamav2/config.py, ExLlamaV2Config.prepare). transformers 5's save_pretrained writes the hub's
tensor names ("model.layers" and "visual." for Qwen2-VL; "language_model.", "vision_tower." and
"multi_modal_projector." for Llava and Mistral 3); tests.tinymodel.make_tiny_hf saves them."""

from __future__ import annotations

import json
from pathlib import Path

VL_ARCHS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
            "LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration")
# Tensors of the tiny models outside the language model, by a part of their in-memory names: not
# redrawn (tests.tinymodel.make_tiny_hf redraws the language model's).
VISION_PARTS = ("visual", "vision_tower", "multi_modal_projector")

PATCH, MERGE, TEMPORAL = 14, 2, 2
# mrope_section: the temporal, height and width shares of a 16-wide head's 8 frequencies (a copy
# goes to transformers, which adds its own keys to the dict it is given)
MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}


def _mrope() -> dict:
    return {"type": MROPE["type"], "mrope_section": list(MROPE["mrope_section"])}


def vl_config(tf, arch: str, common: dict, extra: dict):
    """The tiny config of vision-language ``arch``: the language model as tests.tinymodel's others
    (``common``, then ``extra``), untied, with a one-block vision tower 32 wide."""
    text = common | {"tie_word_embeddings": False} | extra
    if arch == "Qwen2VLForConditionalGeneration":
        vision = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=common["hidden_size"],
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
        return tf.Qwen2VLConfig(text_config=text | {"rope_scaling": _mrope()}, vision_config=vision,
                                tie_word_embeddings=False)
    if arch == "Qwen2_5_VLForConditionalGeneration":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=common["hidden_size"],
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                      fullatt_block_indexes=[1], window_size=56)
        return tf.Qwen2_5_VLConfig(text_config=text | {"rope_scaling": _mrope()}, vision_config=vision,
                                   tie_word_embeddings=False)
    pixtral = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     head_dim=16, patch_size=16, image_size=64)
    if arch == "LlavaForConditionalGeneration":
        return tf.LlavaConfig(text_config=tf.MistralConfig(**text), vision_config=pixtral, tie_word_embeddings=False)
    if arch == "Mistral3ForConditionalGeneration":
        return tf.Mistral3Config(text_config=tf.MistralConfig(**text), vision_config=pixtral, spatial_merge_size=2,
                                 tie_word_embeddings=False)
    raise ValueError(f"no tiny vision-language builder for {arch}")


def write_processor_files(path: Path, arch: str) -> None:
    """preprocessor_config.json as a real checkpoint of ``arch`` has it, with the tiny tower's
    patch and merge sizes (ExLlamaV2 checks them against config.json's), and a chat template."""
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    if arch.startswith("Qwen2"):
        prep = {"image_processor_type": "Qwen2VLImageProcessor", "image_mean": mean, "image_std": std,
                "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
                "min_pixels": 3136, "max_pixels": 12845056, "rescale_factor": 1 / 255, "do_resize": True}
    else:
        prep = {"image_processor_type": "PixtralImageProcessor", "image_mean": mean, "image_std": std,
                "patch_size": {"height": 16, "width": 16}, "resample": 3, "rescale_factor": 1 / 255,
                "size": {"longest_edge": 64}}
    (path / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}"
                                                                           "{% endfor %}"}))
