"""The other names a vision-language checkpoint may give its tensors.

The hub's checkpoints, transformers 5's save_pretrained and ExLlamaV2 0.3.2 name a Llava's
language model ``language_model.model.layers...`` and ``language_model.lm_head``, a Qwen2-VL's
``model.layers...`` and ``lm_head``, and the tower and projector ``vision_tower.``,
``multi_modal_projector.``, ``visual.`` (``ArchSpec.prefix``, ``ArchSpec.extra_prefixes``).
transformers (from 4.52) keeps these models in memory as ``model.language_model.layers...``,
``lm_head``, ``model.vision_tower.``, ``model.multi_modal_projector.``, ``model.visual.``, and
checkpoints under those names exist: transformers 4.52's save_pretrained failed to map them back
(transformers issue #38489), and tools that save the state dict as it is keep them. A checkpoint in that layout is read under its own names and
written under the hub's, through the architecture's keymap (``ArchSpec.keymap``, applied by
``arch.output_name``): the output, and its measurement keys, are what ExLlamaV2 reads, the same as
for the hub's checkpoint of the model.
"""

from __future__ import annotations

from typing import Any

IN_MEMORY = "in_memory"
LANGUAGE_MODEL = "model.language_model."


def in_memory_fields(spec) -> dict[str, Any] | None:
    """The ArchSpec fields (for dataclasses.replace) of ``spec``'s architecture in the in-memory
    layout, or None where it has no such layout (a model without tensors outside its language
    model)."""
    if not spec.extra_prefixes:
        return None
    hub = spec.prefix  # where the hub puts the language model: "language_model." or nothing
    keymap = ((f"${LANGUAGE_MODEL}", f"{hub}model."), ("$lm_head.", f"{hub}lm_head."),
              *((f"$model.{p}", p) for p in spec.extra_prefixes))
    return dict(prefix="", layers=f"{LANGUAGE_MODEL}layers", embed=f"{LANGUAGE_MODEL}embed_tokens",
                final_norm=f"{LANGUAGE_MODEL}norm", head="lm_head",
                extra_prefixes=tuple(f"model.{p}" for p in spec.extra_prefixes), keymap=keymap + spec.keymap)


def source_layout(spec, names) -> str:
    """:data:`IN_MEMORY` where the checkpoint's tensor ``names`` are in that layout, else ""."""
    if in_memory_fields(spec) is None:
        return ""
    return IN_MEMORY if any(n.startswith(LANGUAGE_MODEL) for n in names) else ""
