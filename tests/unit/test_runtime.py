"""Exl2Linear against the decoder it reuses, and the loader's refusals (exl2conv.runtime)."""

import json

import pytest
import torch

from exl2conv.errors import Exl2Error
from exl2conv.pack import decode_linear, pack_linear
from exl2conv.qparams import Group
from exl2conv.runtime import Exl2ForCausalLM, Exl2Linear

K, N, OUT = 96, 64, 50  # N: OUT padded to 32, as the converter pads a linear's output features


def _tensors(seed: int = 0, bias: bool = True) -> dict[str, torch.Tensor]:
    """One linear of three groups (8, 4 and 3 bits), a random row permutation, OUT real columns."""
    g = torch.Generator().manual_seed(seed)
    groups = [Group(8, 32), Group(4, 32), Group(3, 32)]
    codes = torch.cat([torch.randint(0, 1 << gr.bits, (gr.rows, N), generator=g) for gr in groups])
    qs = torch.randint(1, 17, (3, N), generator=g)
    b = torch.randn(N, generator=g) if bias else None
    return pack_linear(codes, qs, torch.rand(3, generator=g) * 0.1 + 0.01, groups,
                       torch.randperm(K, generator=g), b)


def _reference(t: dict, x: torch.Tensor) -> torch.Tensor:
    """x @ the decoded weight, float32 (what `exl2conv eval` multiplies by) plus the bias."""
    w = decode_linear(t).float()[:, :OUT]
    return x.float() @ w + t["bias"][:OUT].float()


def test_float32_forward_is_the_decoded_product():
    t = _tensors()
    lin = Exl2Linear(t, OUT, "lin")
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(1))
    y = lin(x)
    assert y.shape == (2, 5, OUT) and y.dtype == torch.float32
    torch.testing.assert_close(y, _reference(t, x), rtol=1e-6, atol=1e-6)
    # the packed tensors are what the module holds: no float weight among its buffers (q_perm and
    # q_map: the kernels' int32 indices derived at load, not saved)
    assert {n for n, _ in lin.named_buffers()} == {"q_weight", "q_scale", "q_scale_max", "q_groups",
                                                  "q_invperm", "bias", "q_perm", "q_map"}
    assert set(lin.state_dict()) == {"q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"}


def test_half_forward_rounds_once_from_float32():
    t = _tensors(2)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3)).half()
    y = Exl2Linear(t, OUT)(x)
    assert y.dtype == torch.float16
    # the float32 product rounded to fp16 once: equal to the reference rounded the same way
    assert torch.equal(y, _reference(t, x).half())


def test_a_linear_without_its_permutation_is_caught():
    """The check above fails on a wrong variant: the same tensors with q_invperm replaced by the
    identity give another product."""
    t = _tensors(4, bias=False)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(5))
    wrong = dict(t, q_invperm=torch.arange(K, dtype=torch.int32))
    ref = x @ decode_linear(t).float()[:, :OUT]
    assert not torch.allclose(Exl2Linear(wrong, OUT)(x), ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(Exl2Linear(t, OUT)(x), ref, rtol=1e-6, atol=1e-6)


def test_cache_keeps_the_decode_and_a_move_drops_it():
    t = _tensors(6)
    lin = Exl2Linear(t, OUT, cache=True)
    x = torch.randn(2, K)
    y = lin(x)
    assert lin._decoded is not None and torch.equal(lin(x), y)
    lin.to(torch.device("cpu"))
    assert lin._decoded is None
    off = Exl2Linear(t, OUT)
    assert torch.equal(off(x), y) and off._decoded is None


def test_kernel_arguments_are_kept_and_follow_replaced_buffers():
    """The kernels' argument tuple is made once (a decode step's host cost), again after a move or
    cast, and again when a loader assigns new buffers directly."""
    lin = Exl2Linear(_tensors(6), OUT)
    args = lin.kernel_args()
    assert lin.kernel_args() is args
    assert args[2].dtype == torch.float16  # q_scale_max as the kernels read it
    other = _tensors(9)
    lin.q_weight = other["q_weight"]  # a buffer replaced by assignment, as a loader may do
    lin.q_scale = other["q_scale"]
    assert lin.kernel_args() is not args and lin.kernel_args()[0] is other["q_weight"]
    args = lin.kernel_args()
    lin.double()
    assert lin.kernel_args() is not args and lin.kernel_args()[2].dtype == torch.float16


def test_a_cast_module_decodes_the_same():
    """model.float() (or .double()) casts floating buffers, q_scale_max included."""
    t = _tensors(8)
    x = torch.randn(2, K)
    y = Exl2Linear(t, OUT)(x)
    lin = Exl2Linear(t, OUT).double()
    assert lin.q_scale_max.dtype == torch.float64
    torch.testing.assert_close(lin(x.double()).float(), y, rtol=1e-6, atol=1e-6)


def test_inconsistent_tensors_and_widths_are_refused():
    t = _tensors(7)
    with pytest.raises(Exl2Error, match="q_scale"):
        Exl2Linear(dict(t, q_scale=t["q_scale"][:, :4]), OUT, "lin")
    with pytest.raises(ValueError, match="exceeds the packed width"):
        Exl2Linear(t, N + 1, "lin")


def test_unsupported_architecture_is_refused_in_one_line(tmp_path):
    """An architecture exl2conv does not convert."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(Exl2Error) as exc:
        Exl2ForCausalLM.from_quantized(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "BertForMaskedLM" in msg and "cannot load" in msg
    assert "LlamaForCausalLM, MistralForCausalLM" in msg and "GemmoeForCausalLM" in msg


def test_orion_with_a_head_size_stablelm_cannot_hold_is_refused():
    """StableLM derives head_dim from hidden / heads; an Orion whose head_dim differs is refused
    in one line rather than built with the wrong attention shapes."""
    import dataclasses

    from exl2conv.runtime.architectures import RUNTIME

    cfg = _orion_like(head_dim=16, hidden=64, heads=4)
    assert RUNTIME["OrionForCausalLM"].config(cfg)[0] == "StableLmConfig"
    with pytest.raises(Exl2Error, match="head_dim 8 x 4 heads is not hidden_size 64"):
        RUNTIME["OrionForCausalLM"].config(dataclasses.replace(cfg, head_dim=8))


def _orion_like(head_dim: int, hidden: int, heads: int):
    from pathlib import Path

    from exl2conv.model.config import ModelConfig

    return ModelConfig(model_dir=Path("."), arch="OrionForCausalLM", hidden_size=hidden, intermediate_size=128,
                       num_layers=1, num_heads=heads, num_kv_heads=heads, head_dim=head_dim, vocab_size=32,
                       norm_eps=1e-5, rope_theta=1e4, rope_scaling=None, max_position_embeddings=64,
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=None,
                       eos_token_ids=(), sliding_window=None)


def test_missing_transformers_is_one_line(tmp_path, monkeypatch):
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(Exl2Error, match=r"pip install 'exl2conv\[transformers\]'"):
        Exl2ForCausalLM.from_quantized(tmp_path)


def test_package_exports_the_loader():
    import exl2conv

    assert exl2conv.Exl2ForCausalLM is Exl2ForCausalLM


def test_every_architecture_exl2conv_writes_is_run():
    """The runtime's table covers the architectures' output layouts (a Gemma3ForCausalLM is
    written as a Gemma3ForConditionalGeneration), and each class it names is transformers'; an
    architecture transformers has no class for (remote code) names the class and config that
    compute it."""
    tf = pytest.importorskip("transformers")
    from exl2conv.model.arch import ARCHS
    from exl2conv.runtime.architectures import RUNTIME

    written = {spec.out_arch or name for name, spec in ARCHS.items()}
    assert written == set(RUNTIME)
    entries = list(RUNTIME.values()) + [e.no_vision for e in RUNTIME.values() if e.no_vision]
    assert all(hasattr(tf, e.cls) for e in entries)
    remote = {name for name in RUNTIME if not hasattr(tf, name)}
    assert remote == {"YiForCausalLM", "OrionForCausalLM", "IndexForCausalLM", "MiniCPMForCausalLM",
                      "InternLM2ForCausalLM", "GemmoeForCausalLM"}
    assert all(RUNTIME[name].config is not None for name in remote)


def test_names_map_to_the_class_and_fused_parts():
    from exl2conv.runtime.architectures import RUNTIME, class_name

    gpt2, dbrx = RUNTIME["GPT2LMHeadModel"], RUNTIME["DbrxForCausalLM"]
    assert class_name(gpt2, "model.layers.3.self_attn.k_proj") == "transformer.h.3.attn.c_attn#1"
    assert class_name(gpt2, "model.layers.3.self_attn.o_proj") == "transformer.h.3.attn.c_proj"
    assert class_name(gpt2, "model.norm.bias") == "transformer.ln_f.bias"
    assert class_name(dbrx, "model.layers.0.block_sparse_moe.experts.2.v1") == "transformer.blocks.0.ffn.experts.2.v1"
    assert class_name(RUNTIME["LlavaForConditionalGeneration"], "language_model.lm_head") == "lm_head"
    assert class_name(RUNTIME["Qwen2VLForConditionalGeneration"], "visual.merger.mlp.0.weight") == \
        "model.visual.merger.mlp.0.weight"
