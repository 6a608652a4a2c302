"""End to end on tiny random Qwen3MoeForCausalLM, DbrxForCausalLM and GemmoeForCausalLM models
(tests.tinymoe, in their hub checkpoints' layout): convert on the CPU, then check the output's
tensor names and shapes and measurement.json's keys against what ExLlamaV2 0.3.2 reads and
writes, decode every quantized expert back close to the original, and run the decoded model
close to the source."""

import json

import pytest
import torch

from exl2conv.cli import main
from exl2conv.model import WeightIndex, forward, load_config
from exl2conv.model import arch as arch_mod
from tests.e2e.test_architectures import (ARGS, _decoded, _Swapped, check_moe_measurement, expected_names, read_output,
                                          write_parquet)
from tests.tinymoe import MOE_ARCHS, make_tiny_moe

# The expert names in the output, w1 (gate), w3 (up), w2 (down), as ExLlamaV2's architecture.py keys them
EXPERT_NAMES = {"Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                "DbrxForCausalLM": ("block_sparse_moe", ("w1", "v1", "w2")),
                "GemmoeForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2"))}


@pytest.fixture(scope="module", params=MOE_ARCHS)
def converted(request, tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny_moe(root / "model", request.param, seed=3)
    cal = write_parquet(root / "cal.parquet")
    rc = main(["-i", str(src), "-o", str(root / "work"), "-cf", str(root / "out"), "-c", str(cal), *ARGS])
    assert rc == 0
    return request.param, src, root / "work", root / "out"


def test_output_names_and_shapes(converted):
    arch, src, _, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    block, names = EXPERT_NAMES[arch]
    routers = {f"model.layers.{i}.{block}.gate.weight": (4, 64) for i in range(cfg.num_layers)}
    want = expected_names(cfg, index) | routers
    assert set(tensors) == set(want)
    for name, shape in want.items():
        if shape is not None:
            assert tuple(tensors[name].shape) == shape, name
    experts = {n.split(".experts.")[1].rsplit(".", 1)[0] for n in tensors if ".experts." in n}
    assert experts == {f"{j}.{s}" for j in range(4) for s in names}
    assert all(n.startswith(("model.", "lm_head.")) for n in tensors)  # DBRX's names through the keymap
    for i in range(cfg.num_layers):
        source = arch_mod.router_tensor(cfg, i)
        assert torch.equal(tensors[arch_mod.output_name(cfg, source)], index.get(source, dtype=torch.float16))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]


def test_measurement_keys(converted):
    _, src, work, _ = converted
    check_moe_measurement(src, work, experts=4)


def test_decoded_weights_are_close(converted):
    _, src, _, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    decoded = _decoded(cfg, index, read_output(out))
    errs = {name: float((w - index.get(name)).norm() / index.get(name).norm()) for name, w in decoded.items()}
    assert max(errs.values()) < 0.15, errs
    assert sum(errs.values()) / len(errs) < 0.07, errs


def test_quantized_model_runs_close_to_the_original(converted):
    """The decoded model against the source: the relative logit difference shows the decoded
    weights were used (the tiny Gemmoe's softmaxes are one-hot, so its KL is 0)."""
    _, src, _, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    quant = _Swapped(index, _decoded(cfg, index, read_output(out)))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    ref_logits, got_logits = forward.run_model(index, cfg, ids), forward.run_model(quant, cfg, ids)
    ref, got = torch.log_softmax(ref_logits, dim=-1), torch.log_softmax(got_logits, dim=-1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    rel = float((got_logits - ref_logits).norm() / ref_logits.norm())
    assert kl < 0.05 and top1 > 0.8 and 0 < rel < 0.15, (kl, top1, rel)


def test_the_runtime_runs_it(converted, monkeypatch):
    """exl2conv.runtime on the output (tests.runtime_checks.check_runtime): Qwen3-MoE's and DBRX's
    experts as one quantized linear each in place of the class's expert tensors, DBRX's q/k/v as
    its fused Wqkv, Gemmoe (remote code) as Mixtral with Gemma's norms and embedding scale folded
    into its tensors."""
    from tests.runtime_checks import check_runtime

    arch, _, _, out = converted
    check_runtime(out, arch, monkeypatch)
