"""``quant_method: "exl2"`` for transformers: ``AutoModelForCausalLM.from_pretrained(exl2_folder)``
after ``import exl2conv`` (issue 30).

transformers lets a library add a quantization method (``transformers.quantizers``:
``register_quantization_config`` and ``register_quantizer``); :func:`register` adds ``exl2`` with
:class:`Exl2Config` (the ``quantization_config`` that ExLlamaV2 0.3.2's and exl2conv's ``-cf`` write
into config.json) and :class:`Exl2HfQuantizer`. exl2conv.hf_hook calls it as soon as transformers'
quantizers are imported. This module imports transformers: import it only where transformers is.

How a load goes (transformers 5's from_pretrained):

1. before the checkpoint files are looked up, the quantizer names the folder's first
   ``output*.safetensors`` in ``config.transformers_weights`` (transformers looks for
   model.safetensors, which an EXL2 folder does not hold) and unties the head (it is its own
   quantized linear in the files, ExLlamaV2 quantizes the embedding's copy);
2. on the meta-device model, each linear with a ``.q_weight`` in the files becomes an
   :class:`Exl2Linear` whose buffers have the files' shapes and dtypes (q/k head norms too, stored
   once per head), and the other shards join the file list;
3. transformers loads every tensor by name into those buffers, on the device its device_map says;
4. afterwards each linear is checked (:func:`exl2conv.pack.check_linear`), a dense MLP's gate/up
   bias goes back to the model's column order and the head norms to one vector:
   :func:`exl2conv.runtime.model.model_order_bias` and ``one_head_norm``, as
   :meth:`Exl2ForCausalLM.from_quantized` does.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from exl2conv.errors import Exl2Error, FormatError
from exl2conv.pack import QUANT_KEYS, check_linear, find_linears
from exl2conv.runtime.linear import Exl2Linear
from exl2conv.model.weights import open_tensors
from exl2conv.runtime.model import (_files, down_invperm_key, model_order_bias,
                                    one_head_norm)

METHOD = "exl2"
# transformers' own loader reads the files by the class's names and applies none of the runtime's
# renames, fused linears or expert modules (runtime/architectures.py), and this quantizer moves a
# gate/up bias back by the Llama family's down_proj name alone: so from_pretrained takes the
# architectures whose EXL2 names are the class's and whose biases are named so, the others load
# through Exl2ForCausalLM.from_quantized.
FROM_PRETRAINED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Read for real while the model is on the meta device: Exl2Linear checks them at construction
# (check_linear reads their values), and they are small (K + 3G numbers per linear).
SMALL_KEYS = ("q_scale_max", "q_groups", "q_invperm")


class Exl2Config(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of an EXL2 folder (ExLlamaV2 0.3.2's compile.py and
    exl2conv's compile.write_quant_config write the same keys). Informational: the bits each linear
    has are in its own q_groups; nothing here changes how the model loads."""

    def __init__(self, bits: float | None = None, head_bits: int | None = None, version: str | None = None,
                 calibration: dict | None = None, **kwargs):
        self.quant_method = METHOD
        self.bits, self.head_bits, self.version, self.calibration = bits, head_bits, version, calibration
        self.unknown = {k: v for k, v in kwargs.items() if k != "quant_method"}

    def to_dict(self) -> dict:
        out = {"quant_method": METHOD, "version": self.version, "bits": self.bits, "head_bits": self.head_bits,
               "calibration": self.calibration}
        return {**out, **self.unknown}


class Exl2HfQuantizer(HfQuantizer):
    """Loads EXL2 folders through ``from_pretrained`` (pre-quantized only: exl2conv converts)."""

    requires_calibration = True  # transformers cannot quantize to EXL2 on load: `exl2conv` does that
    folder: Path | None = None  # the EXL2 folder, known once update_attn_implementation has seen the config

    def update_attn_implementation(self, config):
        # The one hook that sees the config before transformers resolves the checkpoint files and
        # builds the model (get_hf_quantizer), so the file name and the head's tying are set here.
        arch = (getattr(config, "architectures", None) or ["(none)"])[0]
        if arch not in FROM_PRETRAINED:
            raise Exl2Error(f"architecture {arch}: AutoModelForCausalLM.from_pretrained loads EXL2 models of "
                            f"{', '.join(FROM_PRETRAINED)}; load this one with exl2conv.Exl2ForCausalLM."
                            "from_quantized(path)")
        folder = Path(getattr(config, "_name_or_path", "") or "")
        if not folder.is_dir():
            raise Exl2Error(f"{folder}: from_pretrained loads EXL2 models from a local folder; download "
                            "the repository first (huggingface_hub.snapshot_download)")
        config.transformers_weights = _files(folder)[0].name
        config.tie_word_embeddings = False
        self.folder = folder
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.folder is None:  # a transformers whose from_pretrained skipped the hook above
            raise Exl2Error("this transformers' from_pretrained did not show the quantizer the model's config "
                            "first; load EXL2 folders with exl2conv.Exl2ForCausalLM.from_quantized")
        files = _files(self.folder)
        if checkpoint_files is not None:  # transformers resolved the first shard only (step 1)
            checkpoint_files.extend(str(f) for f in files[1:] if str(f) not in checkpoint_files)
        with ExitStack() as stack:
            where = open_tensors(files, stack)
            self._keys = set(where)
            for name in find_linears(where):
                _replace(model, name, _skeleton(where, name, _linear_of(model, name).out_features))
            self._head_norms = _head_norms_as_stored(model, where)
            _check_against_files(model, where, self.folder)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, mod in model.named_modules():
            if isinstance(mod, Exl2Linear):
                check_linear({k: getattr(mod, k) for k in QUANT_KEYS} | _bias(mod), name)
                if mod.bias is not None:
                    down = down_invperm_key(name)
                    down_mod = model.get_submodule(down.rpartition(".")[0]) if down in self._keys else None
                    if isinstance(down_mod, Exl2Linear):
                        mod.bias = model_order_bias(mod.bias, down_mod.q_invperm)
                    mod.bias = mod.bias[:mod.out_features].contiguous()
        for key, shape in self._head_norms.items():
            parent, _, short = key.rpartition(".")
            t = one_head_norm(key, getattr(_sub(model, parent), short).data, shape)
            setattr(_sub(model, parent), short, torch.nn.Parameter(t.contiguous(), requires_grad=False))
        return model

    def is_serializable(self):
        return False  # the EXL2 folder is the serialized form; save_pretrained would not write it

    @property
    def is_trainable(self) -> bool:
        return False


def _sub(model, name: str):
    return model.get_submodule(name) if name else model


def _linear_of(model, name: str) -> torch.nn.Linear:
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"{name}.q_weight: the model class has no module {name}") from None
    if not isinstance(old, torch.nn.Linear):
        raise FormatError(f"{name}.q_weight: {name} is a {type(old).__name__}, not a linear")
    return old


def _skeleton(where: dict, name: str, out_features: int) -> Exl2Linear:
    """An Exl2Linear for ``name`` with q_weight, q_scale and bias on the meta device, shaped and
    typed as in the files (transformers loads into them), the small tensors read already."""
    tensors = {}
    for key in ("q_weight", "q_scale", "bias"):
        full = f"{name}.{key}"
        if full in where:
            sl = where[full].get_slice(full)
            tensors[key] = torch.empty(sl.get_shape(), dtype=_DTYPES[sl.get_dtype()], device="meta")
    for key in SMALL_KEYS:
        full = f"{name}.{key}"
        if full not in where:
            raise FormatError(f"{full}: missing (a quantized linear needs {', '.join(QUANT_KEYS)})")
        tensors[key] = where[full].get_tensor(full).to("cpu")
    # from_pretrained builds the model under a meta default device; check_linear's reference
    # arange must be a real one
    with torch.device("cpu"):
        lin = Exl2Linear(tensors, out_features, name)
    if "bias" in tensors:  # the stored [N]: cut to out_features after the load (step 4)
        lin.bias = tensors["bias"]
    return lin


def _replace(model, name: str, new: Exl2Linear) -> None:
    old = _linear_of(model, name)
    if new.in_features != old.in_features or (new.bias is None) != (old.bias is None):
        raise FormatError(f"{name}: the EXL2 tensors hold a linear of {new.in_features} inputs "
                          f"{'with' if new.bias is not None else 'without'} a bias; the model's has "
                          f"{old.in_features} {'with' if old.bias is not None else 'without'}")
    parent, _, short = name.rpartition(".")
    setattr(_sub(model, parent), short, new)


def _head_norms_as_stored(model, where: dict) -> dict[str, torch.Size]:
    """Parameters stored with one more leading dimension (q/k norms, once per head) become meta
    parameters of the stored shape, so that transformers loads them instead of reporting a
    mismatch and initialising them at random; collapsed after the load. Returns their keys and
    the class's shapes."""
    stored = {}
    for key, p in list(model.named_parameters()):
        if key not in where:
            continue
        shape = where[key].get_slice(key).get_shape()
        if len(shape) == p.dim() + 1 and tuple(shape[1:]) == tuple(p.shape):
            parent, _, short = key.rpartition(".")
            setattr(_sub(model, parent), short,
                    torch.nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"), requires_grad=False))
            stored[key] = p.shape
    return stored


def _check_against_files(model, where: dict, folder: Path) -> None:
    """Every tensor the model now holds is in the files with its shape: transformers would
    initialise a missing one at random, and one of another shape too, and only warn."""
    missing = []
    for key, t in model.state_dict().items():
        if key not in where:
            missing.append(key)
            continue
        shape = tuple(where[key].get_slice(key).get_shape())
        if shape != tuple(t.shape):
            raise FormatError(f"{key}: expected shape {list(t.shape)}, got {list(shape)}")
    if missing:
        raise FormatError(f"{folder}: {missing[0]} is missing from the EXL2 files"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _bias(mod: Exl2Linear) -> dict:
    return {} if mod.bias is None else {"bias": mod.bias}


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32,
           "I16": torch.int16, "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8}


def register() -> bool:
    """Adds ``exl2`` to transformers' quantization methods; False where another library holds the
    name already (left as it is)."""
    if METHOD in AUTO_QUANTIZER_MAPPING or METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return AUTO_QUANTIZER_MAPPING.get(METHOD) is Exl2HfQuantizer
    register_quantization_config(METHOD)(Exl2Config)
    register_quantizer(METHOD)(Exl2HfQuantizer)
    return True
