"""Qwen3MoeForCausalLM, DbrxForCausalLM and GemmoeForCausalLM: tiny float32 models (tests.tinymoe)
run through exl2conv.model.forward against transformers (Gemmoe: its Mixtral twin); the routing's
renormalization, DBRX's fused experts and clip_qkv, each shown to matter; the names ExLlamaV2
0.3.2 reads; the configs it would run as another model, refused."""

import dataclasses
import json

import pytest
import torch

from exl2conv.errors import Exl2Error
from exl2conv.model import WeightIndex, expected_tensors, layer_linears, load_config
from exl2conv.model import arch as arch_mod
from exl2conv.model import forward as fw
from exl2conv.model.moe_config import caveats
from tests.tinymoe import MOE_ARCHS, make_tiny_moe, reference_model

pytest.importorskip("transformers")


def ids_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {a: make_tiny_moe(root / a, a, seed=3, dtype=torch.float32) for a in MOE_ARCHS}


def logits(path, cfg=None, index=None):
    cfg = cfg or load_config(path)
    return fw.run_model(index or WeightIndex(path), cfg, ids_for(cfg.vocab_size))[..., :cfg.vocab_size]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_forward_matches_transformers(models, arch):
    cfg, index = load_config(models[arch]), WeightIndex(models[arch])
    index.check(expected_tensors(cfg))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (4, 2, 96)
    _, run = reference_model(models[arch], arch)
    ref = run(ids_for(cfg.vocab_size))[..., :cfg.vocab_size]
    assert rel(logits(models[arch], cfg, index), ref) < 1e-5


def test_routing_renormalization():
    """route(): softmax, top k, divided by their sum only when asked."""
    g = torch.Generator().manual_seed(0)
    x, router = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g)
    probs = torch.softmax(x @ router.T, dim=-1)
    top, experts = torch.topk(probs, 3, dim=-1)
    w, e = fw.route(x, router, 3)
    assert torch.equal(e, experts)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True))
    w, _ = fw.route(x, router, 3, renormalize=False)
    torch.testing.assert_close(w, top)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3moe_follows_norm_topk_prob(tmp_path, norm_topk_prob):
    """The forward matches transformers with norm_topk_prob on and off, and the other setting
    (the wrong variant) does not: the flag is read and it matters here."""
    path = make_tiny_moe(tmp_path / "m", "Qwen3MoeForCausalLM", seed=4, dtype=torch.float32,
                         extra_config={"norm_topk_prob": norm_topk_prob})
    cfg = load_config(path)
    assert cfg.moe_renormalize is norm_topk_prob
    _, run = reference_model(path, "Qwen3MoeForCausalLM")
    ref = run(ids_for(cfg.vocab_size))[..., :cfg.vocab_size]
    assert rel(logits(path, cfg), ref) < 1e-5
    wrong = dataclasses.replace(cfg, moe_renormalize=not norm_topk_prob)
    assert rel(logits(path, wrong), ref) > 1e-2
    assert any("always renormalizes" in line for line in caveats(cfg)) is not norm_topk_prob


def test_dbrx_fused_experts_are_split_as_exllamav2_splits_them(models):
    """Expert j's w1/v1 are rows [j*I, (j+1)*I) of the fused [E*I, H] tensors; its w2 the same
    rows of the fused w2, transposed to [H, I] (ExLlamaV2's moe_mlp.py f_beg/f_end and
    module.py load_weight_fused). A split that reshapes the w2 block instead of transposing it
    (the wrong variant) gives another model."""
    path = models["DbrxForCausalLM"]
    cfg, index = load_config(path), WeightIndex(path)
    specs = layer_linears(cfg, 1, "mlp")
    e, i, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    p = "transformer.blocks.1.ffn.experts.mlp"
    for short, stored in (("w1", "w1"), ("w3", "v1"), ("w2", "w2")):
        whole = index.get(f"{p}.{stored}").view(e, i, h)
        for j in range(e):
            spec = specs[f"{short}.{j}"]
            assert spec.tensor == f"{p}.{stored}" and spec.name == f"{p}.{j}.{stored}"
            want = whole[j].T if short == "w2" else whole[j]
            assert torch.equal(fw.load_linear(index, spec), want)
            assert (spec.in_features, spec.out_features) == ((i, h) if short == "w2" else (h, i))
    assert expected_tensors(cfg)[f"{p}.w2"] == (e * i, h)
    _, run = reference_model(path, "DbrxForCausalLM")
    ref = run(ids_for(cfg.vocab_size))[..., :cfg.vocab_size]

    class Reshaped:  # the wrong variant: w2's block read as if it were [H, I] already
        def __getattr__(self, attr):
            return getattr(index, attr)

        def get(self, name, dtype=torch.float32, device=None, rows=None):
            t = index.get(name, dtype=dtype, device=device, rows=rows)
            return t.reshape(t.shape[1], t.shape[0]).T if name.endswith("mlp.w2") and rows else t

    assert rel(logits(path, cfg, index), ref) < 1e-5
    assert rel(logits(path, cfg, Reshaped()), ref) > 1e-2


def test_dbrx_clip_qkv_is_applied(models):
    """Without the clamp the forward leaves transformers' (clip 0.8 bites on the tiny model)."""
    path = models["DbrxForCausalLM"]
    cfg = load_config(path)
    assert cfg.clip_qkv == 0.8 and cfg.norm_eps == 1e-5 and cfg.moe_renormalize
    _, run = reference_model(path, "DbrxForCausalLM")
    ref = run(ids_for(cfg.vocab_size))[..., :cfg.vocab_size]
    assert rel(logits(path, dataclasses.replace(cfg, clip_qkv=None)), ref) > 1e-2
    assert any("ignores clip_qkv" in line for line in caveats(cfg))


def test_output_names_are_exllamav2s(models):
    """DBRX's names through ExLlamaV2's dbrx_keymap; Qwen3-MoE's experts keep their names under
    "mlp" with w1/w3/w2 as measurement columns; every MoE block is keyed "<layer>.block_sparse_moe"."""
    from exl2conv.measure import module_name

    cfg = load_config(models["DbrxForCausalLM"])
    names = {arch_mod.output_name(cfg, s.name) for s in layer_linears(cfg, 0).values()}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.0.block_sparse_moe.experts.3.w1", "model.layers.0.block_sparse_moe.experts.3.v1",
            "model.layers.0.block_sparse_moe.experts.3.w2"} <= names
    for source, out in ((arch_mod.router_tensor(cfg, 0), "model.layers.0.block_sparse_moe.gate.weight"),
                        (arch_mod.norm_tensors(cfg, 0, "attn")[0], "model.layers.0.input_layernorm.weight"),
                        (arch_mod.norm_tensors(cfg, 0, "mlp")[0], "model.layers.0.post_attention_layernorm.weight"),
                        (arch_mod.embedding_tensor(cfg), "model.embed_tokens.weight"),
                        (arch_mod.final_norm_tensor(cfg), "model.norm.weight")):
        assert arch_mod.output_name(cfg, source) == out
    assert module_name(layer_linears(cfg, 1, "mlp"), cfg) == "model.layers.1.block_sparse_moe"

    cfg = load_config(models["Qwen3MoeForCausalLM"])
    spec = layer_linears(cfg, 1, "mlp")["w3.2"]
    assert (spec.name, spec.short) == ("model.layers.1.mlp.experts.2.up_proj", "w3")
    assert arch_mod.router_tensor(cfg, 1) == "model.layers.1.mlp.gate.weight"
    assert module_name(layer_linears(cfg, 1, "mlp"), cfg) == "model.layers.1.block_sparse_moe"
    assert caveats(load_config(models["GemmoeForCausalLM"])) == [
        "ExLlamaV2 0.3.2 marks its Gemmoe support as experimental and not fully tested"]


def _with(path, tmp_path, edit):
    raw = json.loads((path / "config.json").read_text())
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for f in path.glob("*.safetensors"):
        (tmp_path / f.name).symlink_to(f)
    return tmp_path


def test_qwen3moe_transformers5_config_names_are_read(models, tmp_path):
    """transformers 5 saves num_experts as num_local_experts; both are read (ExLlamaV2 reads both)."""
    path = _with(models["Qwen3MoeForCausalLM"], tmp_path,
                 lambda raw: raw.update(num_local_experts=raw.pop("num_experts")))
    assert load_config(path).num_experts == 4


@pytest.mark.parametrize("arch, edit, words", [
    ("Qwen3MoeForCausalLM", lambda raw: raw.update(mlp_only_layers=[1]), "mlp_only_layers [1]"),
    ("Qwen3MoeForCausalLM", lambda raw: raw.update(decoder_sparse_step=2), "decoder_sparse_step 2"),
    ("DbrxForCausalLM", lambda raw: raw["ffn_config"].update(moe_normalize_expert_weights=2), "2-norm"),
    ("DbrxForCausalLM", lambda raw: raw["ffn_config"].update(ffn_hidden_size=64), "equals d_model"),
    ("DbrxForCausalLM", lambda raw: raw["ffn_config"].update(ffn_act_fn={"name": "gelu"}), "hidden_act is 'gelu'"),
    ("DbrxForCausalLM", lambda raw: raw["attn_config"].update(clip_qkv=-1), "attn_config.clip_qkv must be"),
])
def test_configs_exllamav2_would_run_otherwise_are_refused(models, tmp_path, arch, edit, words):
    with pytest.raises(Exl2Error) as e:
        load_config(_with(models[arch], tmp_path, edit))
    msg = str(e.value)
    assert words in msg and "config.json" in msg and "\n" not in msg


def test_unsupported_architecture_lists_the_new_ones(models, tmp_path):
    path = _with(models["GemmoeForCausalLM"], tmp_path, lambda raw: raw.update(architectures=["JambaForCausalLM"]))
    with pytest.raises(Exl2Error) as e:
        load_config(path)
    for name in ("JambaForCausalLM", "MixtralForCausalLM") + MOE_ARCHS:
        assert name in str(e.value)


def test_coverage_of_128_experts_is_one_line_each():
    """Qwen3-MoE's 128 experts at top-8 average 1/16 of the tokens, under ExLlamaV2's tenth: the
    rule flags most of them, and the summary and the warning stay one short line each."""
    from exl2conv.moe import ExpertCoverage

    g = torch.Generator().manual_seed(0)
    cov = ExpertCoverage("model.layers.0.block_sparse_moe", 128, 64)
    for _ in range(4):
        counts = torch.zeros(1, 128, dtype=torch.int64)
        counts[0] = torch.bincount(torch.randint(0, 128, (64 * 8,), generator=g), minlength=128)
        cov.add_rows(counts)
    assert len(cov.flagged()) > 100
    for line in (cov.summary(), cov.warning()):
        assert "\n" not in line and len(line) < 400, line
    assert f"experts 0, 1, 2, 3, 4, 5, 6, 7 and {len(cov.flagged()) - 8} more ({len(cov.flagged())} of 128)" \
        in cov.warning()
    assert "each of 128 experts" in cov.summary()


def test_caveats_are_printed_as_the_job_starts(models, capsys):
    """print_plan ends with one warning line per caveat (Gemmoe: ExLlamaV2's experimental note)."""
    from exl2conv.report import Reporter, print_plan

    class Job(dict):
        out_dir = "work"

    job = Job(in_dir="m", compile_full=None, cal_dataset="c.parquet", dataset_rows=8, measurement_rows=4,
              length=64, measurement_length=64, output_measurement=None, bits=4.0, head_bits=6,
              shard_size=8192.0, rope_scale=None, rope_alpha=None)
    print_plan(job, "cpu", Reporter(), load_config(models["GemmoeForCausalLM"]))
    err = capsys.readouterr().err.splitlines()
    assert err == [" !! Warning: ExLlamaV2 0.3.2 marks its Gemmoe support as experimental and not fully tested"]
    print_plan(job, "cpu", Reporter(), load_config(models["Qwen3MoeForCausalLM"]))
    assert capsys.readouterr().err == ""


def test_stacked_experts_are_refused_with_one_line(models, tmp_path):
    """transformers 5's in-memory layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) saved as is:
    refused, naming the tensor and what to do."""
    from safetensors.torch import load_file, save_file

    from exl2conv.validate import load_model

    src = models["Qwen3MoeForCausalLM"]
    tensors = load_file(str(src / "model.safetensors"))
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        gate_up = [torch.cat([tensors.pop(f"{p}.{j}.gate_proj.weight"), tensors.pop(f"{p}.{j}.up_proj.weight")])
                   for j in range(4)]
        tensors[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{p}.down_proj"] = torch.stack([tensors.pop(f"{p}.{j}.down_proj.weight") for j in range(4)])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(Exl2Error) as e:
        load_model(tmp_path, None, None)
    assert "model.layers.0.mlp.experts.gate_up_proj" in str(e.value) and "save_pretrained" in str(e.value)
    # Gemmoe (and Mixtral): hub names under block_sparse_moe, transformers 5's in memory under mlp
    raw = json.loads((src / "config.json").read_text()) | {"architectures": ["GemmoeForCausalLM"],
                                                            "num_local_experts": 4, "hidden_act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(Exl2Error) as e:
        load_model(tmp_path, None, None)
    assert "model.layers.0.mlp.experts.gate_up_proj" in str(e.value)
