"""The output's config.json where the copied one would be misread by ExLlamaV2 0.3.2.

Five cases. First, a config written by transformers 5 keeps the RoPE settings (rope_theta, the
scaling, partial_rotary_factor) in ``rope_parameters``, which ExLlamaV2 does not read: it would run
the model at its defaults (base 10000, every dimension rotated). The output's config.json gains
the older top-level keys with the same values (:func:`legacy_rope_keys`); transformers reads
either form.

Then, ExLlamaV2 reads the norms' epsilon from one key per architecture
(``ArchSpec.exllamav2_eps_key``) and refuses a config without it: Starcoder2's configs name it
norm_epsilon, and ExLlamaV2 0.3.2 asks for layer_norm_epsilon. The output's config.json gains
that key with the model's value.

Third, Cohere2's layer kinds: ExLlamaV2 reads them from ``sliding_window_pattern`` only (every
P-th layer global; without the key it alternates), where transformers 5 writes ``layer_types``:
the output's config.json gains the pattern, and layers that follow none are refused.

Fourth, the vision-language models (Qwen2-VL, Qwen2.5-VL, Llava with Pixtral, Mistral 3): ExLlamaV2
requires at load settings that a config written by transformers 5 keeps elsewhere or lacks
(:func:`mrope_keys`, :func:`vision_keys`).

Fifth, an output that takes another architecture's layout (``ArchSpec.out_arch``).

ExLlamaV2 0.3.2 has no entry for Gemma3ForCausalLM (the text-only Gemma 3): its loader takes it
for a Llama and computes garbage. Its Gemma3ForConditionalGeneration entry runs the same language
model, and needs no vision tower (exllamav2/architecture.py adds no vision tensors to the ones it
expects; config.py reads the vision settings only when ``vision_config`` is there). So the output
of a Gemma3ForCausalLM is written as that model's language model: tensors under
``language_model.`` (arch.output_name) and this config.json, which holds what ExLlamaV2's
config.py reads where it reads it (docs/format.md):

- the text model's fields under ``text_config``, with the RoPE in the older keys (``rope_theta``,
  ``rope_scaling``, ``rope_local_base_freq``): ExLlamaV2 does not read transformers 5's
  ``rope_parameters``;
- at the top level, what it reads only there: the token ids and ``sliding_window_pattern`` (every
  P-th layer attends globally);
- no ``vision_config``.
"""

from __future__ import annotations

import json
from typing import Any

from exl2conv.errors import Exl2Error
from exl2conv.model.arch import spec_of

# ExLlamaV2 0.3.2 runs Gemma 3's sliding-window layers at this RoPE base, whatever the config says.
EXLLAMAV2_LOCAL_ROPE_BASE = 10_000.0
TOP_LEVEL_ONLY = ("bos_token_id", "eos_token_id", "pad_token_id")


def sliding_window_pattern(cfg) -> int:
    """P such that layer i attends globally exactly when (i + 1) % P == 0, as ExLlamaV2 can express
    it; Exl2Error when the model's layers do not follow such a pattern."""
    sliding = list(cfg.sliding_layers)
    pattern = next((i + 1 for i, s in enumerate(sliding) if not s), len(sliding) + 1)
    if sliding != [bool((i + 1) % pattern) for i in range(len(sliding))]:
        raise Exl2Error(f"{cfg.model_dir / 'config.json'}: the layers' attention types do not repeat with one "
                        "period (every P-th layer global), the only pattern ExLlamaV2 0.3.2 can run for "
                        f"{cfg.arch}; its EXL2 output would run wrongly, so it is not converted")
    return pattern


def check_expressible(cfg) -> None:
    """Refuse, before any work, a model whose output ExLlamaV2 would run as another model: layer
    kinds that its sliding_window_pattern cannot express (Cohere2, and a model written in another
    architecture's layout), a local RoPE base it would not use."""
    spec = spec_of(cfg)
    if spec.rope_sliding_only or spec.out_arch:
        sliding_window_pattern(cfg)
    if spec.out_arch and cfg.rope_local_theta is not None and float(cfg.rope_local_theta) != EXLLAMAV2_LOCAL_ROPE_BASE:
        raise Exl2Error(f"{cfg.model_dir / 'config.json'}: the sliding-window layers use RoPE base "
                        f"{cfg.rope_local_theta:g}, and ExLlamaV2 0.3.2 runs {cfg.arch} models at "
                        f"{EXLLAMAV2_LOCAL_ROPE_BASE:g} whatever the config says; its EXL2 output would run "
                        "wrongly, so it is not converted")


def nested_config(cfg) -> dict[str, Any]:
    """The output's config.json for ``cfg`` (an architecture with ``out_arch``), from its source
    config.json: see the module docstring."""
    spec = spec_of(cfg)
    text = {k: v for k, v in cfg.raw.items() if k not in ("architectures", "rope_parameters", "auto_map")}
    text["model_type"] = "gemma3_text"
    text["rope_theta"] = cfg.rope_theta
    text["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if cfg.rope_local_theta is not None:
        text["rope_local_base_freq"] = cfg.rope_local_theta
    out: dict[str, Any] = {"architectures": [spec.out_arch], "model_type": "gemma3"}
    out.update({k: cfg.raw[k] for k in TOP_LEVEL_ONLY if k in cfg.raw})
    out["sliding_window_pattern"] = sliding_window_pattern(cfg)
    for k in ("torch_dtype", "dtype", "transformers_version"):
        if k in cfg.raw:
            out[k] = cfg.raw[k]
    out["text_config"] = text
    return out


def legacy_rope_keys(cfg, fields: dict) -> dict[str, Any]:
    """The RoPE keys ExLlamaV2 reads, with the values the model uses, that the config fields
    ``fields`` (the top level, or text_config) lack because they keep them in transformers 5's
    ``rope_parameters``; empty where there is no rope_parameters."""
    if not isinstance(fields.get("rope_parameters"), dict):
        return {}
    wanted: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        # under "rope_type" only: ExLlamaV2 0.3.2 reads either name and refuses a dict with both
        wanted["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.partial_rotary_factor != 1.0:
        wanted["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.rope_local_theta is not None:
        wanted["rope_local_base_freq"] = cfg.rope_local_theta
    return {k: v for k, v in wanted.items() if fields.get(k) is None}


def output_config(cfg) -> dict[str, Any] | None:
    """The config.json the output needs instead of the source's copy, or None where the copy is
    right as it is. The legacy keys go where ExLlamaV2 reads the language model's fields: the top
    level, or ``text_config`` (Gemma3ForConditionalGeneration)."""
    spec = spec_of(cfg)
    if spec.out_arch:
        return nested_config(cfg)
    source = json.loads((cfg.model_dir / "config.json").read_text(encoding="utf-8"))
    # a flat config (Qwen2-VL's on the hub) holds the language model's fields at the top level
    fields = source["text_config"] if spec.text_config and isinstance(source.get("text_config"), dict) else source
    missing = legacy_rope_keys(cfg, fields) | mrope_keys(cfg, fields)
    vision = vision_keys(cfg, source.get("vision_config"))
    if spec.exllamav2_eps_key and fields.get(spec.exllamav2_eps_key) is None:
        missing[spec.exllamav2_eps_key] = cfg.norm_eps
    if spec.rope_sliding_only and fields.get("sliding_window_pattern") is None:
        # ExLlamaV2 reads the layers' kinds from this key alone (default 1: alternate layers)
        missing["sliding_window_pattern"] = sliding_window_pattern(cfg)
    if not missing and not vision:
        return None
    fields.update(missing)
    if vision:
        source["vision_config"].update(vision)
    return source


def mrope_keys(cfg, fields: dict) -> dict[str, Any]:
    """Qwen2-VL: the rope_scaling ExLlamaV2 reads the position sections of images from
    (config.py, ExLlamaV2Config.prepare: type "mrope" -> mrope_section), where the fields lack it
    (transformers 5 keeps it in rope_parameters) or name the type twice, which ExLlamaV2 refuses."""
    if not spec_of(cfg).mrope:
        return {}
    section = next((d["mrope_section"] for d in (fields.get("rope_scaling"), fields.get("rope_parameters"))
                    if isinstance(d, dict) and d.get("mrope_section") is not None), None)
    wanted = {"type": "mrope", "mrope_section": section}
    return {"rope_scaling": wanted} if section is not None and fields.get("rope_scaling") != wanted else {}


def vision_keys(cfg, vision) -> dict[str, Any]:
    """The vision_config keys ExLlamaV2 0.3.2 requires at load (config.py, ExLlamaV2Config.prepare)
    that a config written by transformers 5 lacks: the tower's RoPE base, which it keeps in
    rope_parameters (Pixtral's is read with no default), and Qwen2-VL's and Qwen2.5-VL's
    spatial_patch_size, which transformers names patch_size."""
    if not isinstance(vision, dict) or not spec_of(cfg).extra_prefixes:
        return {}
    out: dict[str, Any] = {}
    params = vision.get("rope_parameters")
    if vision.get("rope_theta") is None and isinstance(params, dict) and params.get("rope_theta") is not None:
        out["rope_theta"] = params["rope_theta"]
    if spec_of(cfg).mrope and vision.get("spatial_patch_size") is None \
            and vision.get("patch_size") is not None:
        out["spatial_patch_size"] = vision["patch_size"]
    return out
