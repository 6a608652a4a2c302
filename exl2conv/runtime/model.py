"""Exl2ForCausalLM: an EXL2 folder loaded as a transformers model whose linears stay packed.

The transformers class the architecture table names (:mod:`exl2conv.runtime.architectures`) is
built with its parameters on the meta device (no weights allocated; buffers the class computes at
init, such as the rotary tables, are computed as usual), each quantized linear (a
``<name>.q_weight`` in the files) takes the place of the class's module of that name as an
:class:`Exl2Linear` holding the packed tensors (a part of a fused linear, an expert of a mixture:
:mod:`exl2conv.runtime.modules`), and the unquantized tensors (embeddings, norms, routers, a vision
tower) are loaded as they are.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from exl2conv.model.weights import open_tensors
from exl2conv.errors import Exl2Error, FormatError
from exl2conv.pack import LINEAR_KEYS, find_linears, mlp_bias_from_runtime_order
from exl2conv.qparams import MLP_INPUT_LINEARS
from exl2conv.runtime.architectures import RUNTIME, RuntimeArch, class_name, runtime_arch
from exl2conv.runtime.linear import Exl2Linear
from exl2conv.runtime.modules import Exl2Experts, FusedExl2Linear

# Each checked against the decoded forward (tests/e2e/test_runtime.py)
SUPPORTED = tuple(RUNTIME)
_SAME_NAMES = RuntimeArch("")  # no renaming: load_linears' default


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


def _config_json(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise Exl2Error(f"{path / 'config.json'}: not readable ({exc})") from None


def _linear_specs(cfg) -> dict:
    """EXL2 name -> exl2conv.model's LinearSpec of every layer linear in the folder of ``cfg``
    (the head is not among them): the real output width of each (the files pad it to 32) and its
    role."""
    from exl2conv.model import arch

    return {arch.output_name(cfg, s.name): s
            for i in range(cfg.num_layers) for s in arch.layer_linears(cfg, i).values()}


def _down_names(names: list[str], specs: dict) -> dict[str, str]:
    """EXL2 name of each dense MLP's gate or up linear -> its down projection's. ``specs`` (EXL2
    name -> LinearSpec) gives the roles; without them, the Llama family's names."""
    if not specs:
        return {n: f"{n.rpartition('.')[0]}.down_proj" for n in names if n.rpartition(".")[2] in MLP_INPUT_LINEARS}
    dense = {n: s for n, s in specs.items() if s.expert is None}
    down = {s.name.rpartition(".")[0]: n for n, s in dense.items() if s.short == "down_proj"}
    return {n: down[s.name.rpartition(".")[0]] for n, s in dense.items() if s.short in MLP_INPUT_LINEARS}


def _linear_tensors(where: dict, name: str, down: str | None) -> dict[str, torch.Tensor]:
    tensors = {k: where[f"{name}.{k}"].get_tensor(f"{name}.{k}") for k in LINEAR_KEYS if f"{name}.{k}" in where}
    invperm = f"{down}.q_invperm"
    if "bias" in tensors and down is not None and invperm in where:
        tensors["bias"] = model_order_bias(tensors["bias"], where[invperm].get_tensor(invperm))
    return tensors


def down_invperm_key(name: str) -> str | None:
    """The key of the q_invperm that orders linear ``name``'s stored bias in the Llama family's
    names: its MLP's down projection's for a gate/up projection, else None (every other bias is
    stored in the model's order). The transformers quantizer's loader reads the class's own names."""
    parent, _, short = name.rpartition(".")
    return f"{parent}.down_proj.q_invperm" if short in MLP_INPUT_LINEARS else None


def model_order_bias(bias: torch.Tensor, down_invperm: torch.Tensor) -> torch.Tensor:
    """A dense MLP's gate/up bias [N] as stored back in the model's own column order. ExLlamaV2 0.3.2
    stores it in its down projection's q_perm order (pack.mlp_bias_to_runtime_order; its mlp.py
    permutes the weights' columns to match at load). decode_linear gives the weights in the model's
    own order, so the bias goes back too."""
    return mlp_bias_from_runtime_order(bias, down_invperm)


def _features(mod: torch.nn.Module) -> tuple[int, int, bool]:
    """(in, out, biased) of a linear of the class: an nn.Linear, or GPT-2's Conv1D (weight [in, out])."""
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features, mod.bias is not None
    if type(mod).__name__ == "Conv1D":
        return mod.weight.shape[0], mod.weight.shape[1], mod.bias is not None
    raise TypeError(type(mod).__name__)


def _set(model: torch.nn.Module, name: str, mod: torch.nn.Module) -> None:
    parent, _, short = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, short, mod)


def _place(model: torch.nn.Module, target: str, new: torch.nn.Module, exl2_name: str) -> None:
    """``new`` in place of the class's linear ``target``, once their shapes are seen to agree."""
    try:
        old = model.get_submodule(target)
    except AttributeError:
        raise FormatError(f"{exl2_name}.q_weight: the model class has no module {target}") from None
    try:
        k, n, biased = _features(old)
    except TypeError:
        raise FormatError(f"{exl2_name}.q_weight: {target} is a {type(old).__name__}, not a linear") from None
    has_bias = all(p.bias is not None for p in getattr(new, "parts", [new]))
    if (new.in_features, new.out_features, has_bias) != (k, n, biased):
        raise FormatError(f"{exl2_name}: the EXL2 tensors hold a linear of {new.in_features} inputs and "
                          f"{new.out_features} outputs {'with' if has_bias else 'without'} a bias; the model's "
                          f"{target} has {k} and {n} {'with' if biased else 'without'}")
    _set(model, target, new)


def load_linears(model: torch.nn.Module, where: dict, device, cache: bool,
                 entry: RuntimeArch = _SAME_NAMES, specs: dict | None = None) -> set[str]:
    """Replace each quantized linear of ``model`` by an Exl2Linear on ``device`` (the parts of a
    fused one by a FusedExl2Linear); returns the class's names of the modules replaced. ``entry``
    maps the files' names to the class's (default: the same names); ``specs`` (EXL2 name ->
    LinearSpec) gives each linear's real width and role, else the class's module gives the width."""
    specs = specs or {}
    names = find_linears(where)
    downs = _down_names(names, specs)
    fused: dict[str, dict[int, Exl2Linear]] = {}
    for name in names:
        target = class_name(entry, name)
        base, _, part = target.partition("#")
        try:
            width = specs[name].out_features if name in specs else _features(model.get_submodule(target))[1]
        except (AttributeError, TypeError):
            raise FormatError(f"{name}.q_weight: the model class has no linear {target}") from None
        new = Exl2Linear(_linear_tensors(where, name, downs.get(name)), width, name, cache=cache).to(device)
        if part:
            fused.setdefault(base, {})[int(part)] = new
        else:
            _place(model, target, new, name)
    for base, parts in fused.items():
        _place(model, base, FusedExl2Linear([parts[i] for i in sorted(parts)]), base)
    return {class_name(entry, n).partition("#")[0] for n in names}


def _install_experts(model: torch.nn.Module, entry: RuntimeArch, specs: dict) -> None:
    """Each MoE layer's experts module of the class (3D parameters) replaced by an Exl2Experts
    whose linears are meta placeholders of the files' expert linears, which load_linears fills."""
    if entry.experts is None:
        return
    layers: dict[str, dict[int, dict[str, torch.nn.Module]]] = {}
    for name, spec in specs.items():
        if spec.expert is None:
            continue
        module, _, short = class_name(entry, name).rpartition(".")  # <experts>.<j>, w1
        experts, _, j = module.rpartition(".")
        layers.setdefault(experts, {}).setdefault(int(j), {})[short] = torch.nn.Linear(
            spec.in_features, spec.out_features, bias=spec.bias, device="meta")
    for experts, by_index in layers.items():
        try:
            act = model.get_submodule(experts).get_submodule(entry.experts_act)
        except AttributeError:
            raise FormatError(f"{experts}: the model class has no experts module with {entry.experts_act}") from None
        _set(model, experts, Exl2Experts([by_index[j] for j in sorted(by_index)], entry.experts, act))


@contextmanager
def _parameters_on_meta():
    """The class's parameters made on the meta device as they are registered, its buffers where
    they are made (the CPU): what the class computes at init (rotary tables, a vision tower's
    too) is computed, nothing is allocated for the weights the files replace. torch's meta device
    context would leave those buffers empty, and the modules holding them cannot all be rebuilt
    from a config."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def one_head_norm(key: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` as the class's ``shape``: q/k head norms are stored once per head for ExLlamaV2
    ([heads, d], compile.py), one vector [d] in transformers. Other tensors pass unchanged."""
    if t.shape != shape and t.dim() == len(shape) + 1 and t.shape[1:] == shape:
        if not bool((t == t[0]).all()):
            raise FormatError(f"{key}: per-head norms differ; the transformers class holds one per layer")
        return t[0]
    return t


def _plain_tensor(where: dict, key: str, like: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    t = one_head_norm(key, where[key].get_tensor(key), like.shape)
    if t.shape != like.shape:
        raise FormatError(f"{key}: expected shape {list(like.shape)}, got {list(t.shape)}")
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _build(tf, path: Path, entry: RuntimeArch, cfg):
    """The class of ``entry``, its parameters on the meta device, configured from ``path`` (a
    remote-code family: from ``cfg``, exl2conv's reading of it, through ``entry.config``)."""
    if entry.config is not None:
        config_class, kwargs = entry.config(cfg)
        config = getattr(tf, config_class)(**kwargs)
    else:
        config = tf.AutoConfig.from_pretrained(str(path))
    if entry.text_config:
        config = config.text_config
    # The head is its own quantized linear even in a tied model (ExLlamaV2 quantizes the
    # embedding's copy): transformers must not tie lm_head to the embedding.
    for c in (config, getattr(config, "text_config", None)):
        if c is not None:
            c.tie_word_embeddings = False
    with _parameters_on_meta():
        return getattr(tf, entry.cls)(config)


class Exl2ForCausalLM:
    """Loads EXL2 folders as transformers models: ``Exl2ForCausalLM.from_quantized(path)``."""

    @staticmethod
    def from_quantized(path, device="cpu", dtype: torch.dtype = torch.float16, cache_decoded: bool = False):
        """The EXL2 model in folder ``path`` (config.json and output*.safetensors, ours or
        ExLlamaV2's) as an instance of the transformers class the runtime's table gives its
        architecture (:data:`exl2conv.runtime.architectures.RUNTIME`), in eval mode on
        ``device``: quantized linears as :class:`Exl2Linear` (packed; ``cache_decoded`` keeps each
        decoded fp16 weight after first use), other tensors in ``dtype``. A vision-language
        model is its whole transformers class, its vision tower as the files hold it (unquantized).
        Raises Exl2Error with one line when transformers is missing, the architecture is not
        supported, or the files do not fit the class."""
        path = Path(path)
        raw = _config_json(path)
        entry = runtime_arch((raw.get("architectures") or ["(none)"])[0], raw)
        tf = _transformers()
        device = torch.device(device)
        from exl2conv.model import load_config

        with ExitStack() as stack:
            where = open_tensors(_files(path), stack)
            cfg = load_config(path)
            specs = _linear_specs(cfg)
            model = _build(tf, path, entry, cfg)
            _install_experts(model, entry, specs)
            load_linears(model, where, device, cache_decoded, entry, specs)
            names = {class_name(entry, k): k for k in where}
            state = {}
            for key, t in model.state_dict().items():
                if not t.is_meta:  # a buffer computed at init, or an Exl2Linear's
                    continue
                if key not in names:
                    raise FormatError(f"{path}: {key} is missing from the EXL2 files")
                state[key] = _plain_tensor(where, names[key], t, dtype, device)
                if entry.plain is not None:
                    state[key] = entry.plain(names[key], state[key], cfg)
            model.load_state_dict(state, strict=False, assign=True)
        model.to(device)
        model.config.dtype = dtype
        if (path / "generation_config.json").is_file():  # -cf copies the source's; generate() reads it
            model.generation_config = tf.GenerationConfig.from_pretrained(str(path))
        return model.eval()
