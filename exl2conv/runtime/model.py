"""Exl2ForCausalLM: an EXL2 folder loaded as a transformers model whose linears stay packed.

The transformers class config.json names is built on the meta device (no weights allocated), each
quantized linear (a ``<name>.q_weight`` in the files) is replaced by an :class:`Exl2Linear` holding
the packed tensors, the unquantized tensors (embeddings, norms) are loaded as they are, and what the
class computes at init (the rotary tables) is rebuilt on the target device.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from exl2conv.errors import Exl2Error, FormatError
from exl2conv.pack import LINEAR_KEYS, find_linears, mlp_bias_from_runtime_order
from exl2conv.qparams import MLP_INPUT_LINEARS
from exl2conv.runtime.linear import Exl2Linear

# Architectures whose EXL2 tensors keep the transformers class's own names (no keymap, no output
# prefix in exl2conv.model.arch) and whose layers transformers computes as exl2conv.model.forward
# does. Others follow once each is checked against the decoded forward.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise Exl2Error("the EXL2 runtime builds a transformers model: pip install 'exl2conv[transformers]'") from None
    return transformers


def _files(path: Path) -> list[Path]:
    files = sorted(path.glob("output*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise Exl2Error(f"{path}: no .safetensors files; give an EXL2 model folder")
    return files


def _architecture(path: Path) -> str:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise Exl2Error(f"{path / 'config.json'}: not readable ({exc})") from None
    archs = raw.get("architectures") or ["(none)"]
    if archs[0] not in SUPPORTED:
        raise Exl2Error(f"{path}: architecture {archs[0]} is not supported by the EXL2 runtime yet "
                        f"(supported so far: {', '.join(SUPPORTED)})")
    return archs[0]


def _open(files: list[Path], stack: ExitStack) -> dict[str, object]:
    where: dict[str, object] = {}
    for f in files:
        try:
            h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
        except Exception as exc:  # noqa: BLE001
            raise FormatError(f"{f}: not a readable safetensors file ({exc})") from None
        for k in h.keys():
            where[k] = h
    return where


def _linear_tensors(where: dict, name: str) -> dict[str, torch.Tensor]:
    tensors = {k: where[f"{name}.{k}"].get_tensor(f"{name}.{k}") for k in LINEAR_KEYS if f"{name}.{k}" in where}
    down = down_invperm_key(name)
    if "bias" in tensors and down in where:
        tensors["bias"] = model_order_bias(tensors["bias"], where[down].get_tensor(down))
    return tensors


def down_invperm_key(name: str) -> str | None:
    """The key of the q_invperm that orders linear ``name``'s stored bias: its MLP's down projection's
    for a gate/up projection, else None (every other bias is stored in the model's order)."""
    parent, _, short = name.rpartition(".")
    return f"{parent}.down_proj.q_invperm" if short in MLP_INPUT_LINEARS else None


def model_order_bias(bias: torch.Tensor, down_invperm: torch.Tensor) -> torch.Tensor:
    """A dense MLP's gate/up bias [N] as stored back in the model's own column order. ExLlamaV2 0.3.2
    stores it in its down projection's q_perm order (pack.mlp_bias_to_runtime_order; its mlp.py
    permutes the weights' columns to match at load). decode_linear gives the weights in the model's
    own order, so the bias goes back too."""
    return mlp_bias_from_runtime_order(bias, down_invperm)


def load_linears(model: torch.nn.Module, where: dict, device, cache: bool) -> set[str]:
    """Replace each quantized linear of ``model`` by an Exl2Linear on ``device``; returns their names."""
    names = find_linears(where)
    for name in names:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{name}.q_weight: the model class has no module {name}") from None
        if not isinstance(old, torch.nn.Linear):
            raise FormatError(f"{name}.q_weight: {name} is a {type(old).__name__}, not a linear")
        new = Exl2Linear(_linear_tensors(where, name), old.out_features, name, cache=cache).to(device)
        if new.in_features != old.in_features or (new.bias is None) != (old.bias is None):
            raise FormatError(f"{name}: the EXL2 tensors hold a linear of {new.in_features} inputs "
                              f"{'with' if new.bias is not None else 'without'} a bias; the model's has "
                              f"{old.in_features} {'with' if old.bias is not None else 'without'}")
        parent, _, short = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, short, new)
    return set(names)


def _plain_tensor(where: dict, key: str, like: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    t = one_head_norm(key, where[key].get_tensor(key), like.shape)
    if t.shape != like.shape:
        raise FormatError(f"{key}: expected shape {list(like.shape)}, got {list(t.shape)}")
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def one_head_norm(key: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` as the class's ``shape``: q/k head norms are stored once per head for ExLlamaV2
    ([heads, d], compile.py), one vector [d] in transformers. Other tensors pass unchanged."""
    if t.shape != shape and t.dim() == len(shape) + 1 and t.shape[1:] == shape:
        if not bool((t == t[0]).all()):
            raise FormatError(f"{key}: per-head norms differ; the transformers class holds one per layer")
        return t[0]
    return t


def _rebuild_meta_modules(model: torch.nn.Module, device) -> None:
    """Modules left with tensors on the meta device hold what the class computes at init (the
    rotary embedding's inv_freq, a non-persistent buffer): built again on ``device``."""
    for name, mod in list(model.named_modules()):
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        if not any(t.is_meta for _, t in own):
            continue
        if not hasattr(mod, "config") or list(mod.parameters(recurse=False)):
            bad = next(n for n, t in own if t.is_meta)
            raise FormatError(f"{name}.{bad}: not in the EXL2 files and not computable")
        with torch.device(device):
            fresh = type(mod)(config=mod.config)
        parent, _, short = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, short, fresh)


class Exl2ForCausalLM:
    """Loads EXL2 folders as transformers models: ``Exl2ForCausalLM.from_quantized(path)``."""

    @staticmethod
    def from_quantized(path, device="cpu", dtype: torch.dtype = torch.float16, cache_decoded: bool = False):
        """The EXL2 model in folder ``path`` (config.json and output*.safetensors, ours or
        ExLlamaV2's) as an instance of the transformers class config.json names, in eval mode on
        ``device``: quantized linears as :class:`Exl2Linear` (packed; ``cache_decoded`` keeps each
        decoded fp16 weight after first use), other tensors in ``dtype``. Raises Exl2Error with one
        line when transformers is missing, the architecture is not supported yet, or the files do
        not fit the class."""
        path = Path(path)
        arch = _architecture(path)
        tf = _transformers()
        config = tf.AutoConfig.from_pretrained(str(path))
        # The head is its own quantized linear even in a tied model (ExLlamaV2 quantizes the
        # embedding's copy): transformers must not tie lm_head to the embedding.
        config.tie_word_embeddings = False
        device = torch.device(device)
        with ExitStack() as stack:
            where = _open(_files(path), stack)
            with torch.device("meta"):
                model = getattr(tf, arch)(config)
            linears = load_linears(model, where, device, cache_decoded)
            state = {}
            for key, t in model.state_dict().items():
                if key.rpartition(".")[0] in linears:
                    continue
                if key not in where:
                    raise FormatError(f"{path}: {key} is missing from the EXL2 files")
                state[key] = _plain_tensor(where, key, t, dtype, device)
            model.load_state_dict(state, strict=False, assign=True)
        _rebuild_meta_modules(model, device)
        model.config.dtype = dtype
        if (path / "generation_config.json").is_file():  # -cf copies the source's; generate() reads it
            model.generation_config = tf.GenerationConfig.from_pretrained(str(path))
        return model.eval()
