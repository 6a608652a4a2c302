"""End to end on tiny random models of each added architecture (built and saved by transformers,
or from the key names of a remote-code family: tests.tinymodel.make_tiny_remote):
convert on the CPU, then check the output tensors' names and shapes against what ExLlamaV2 loads
(reference 6.8, 8) and decode every quantized linear back to weights close to the originals.
Mixtral (mixture of experts) also has its measurement.json checked (reference 3.3, 3.7)."""

import json

import pytest
import torch
from safetensors import safe_open

from exl2conv.cli import main
from exl2conv.model import WeightIndex, layer_linears, load_config
from exl2conv.model import arch as arch_mod
from exl2conv.model import forward
from exl2conv.pack import LINEAR_KEYS, decode_linear
from exl2conv.qparams import MLP_OPTIONS, QParams
from tests.tinymodel import HF_ARCHS, REMOTE_ARCHS, make_tiny_hf, make_tiny_mixtral, make_tiny_remote

ARGS = ["-ml", "64", "-l", "64", "-r", "8", "-mr", "4", "-b", "6.0"]


def write_parquet(path):
    """A few rows of varied bytes: the built-in set's 115 rows would make these tests slow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = torch.Generator().manual_seed(5)
    words = ["".join(chr(int(c)) for c in torch.randint(33, 127, (int(n),), generator=g))
             for n in torch.randint(2, 9, (1200,), generator=g)]
    texts = [" ".join(words[i::8]) for i in range(8)]
    pq.write_table(pa.table({"text": texts}), str(path))
    return path


def read_output(folder):
    out = {}
    for f in sorted(folder.glob("output*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def make_tiny(path, arch: str, seed: int):
    if arch in REMOTE_ARCHS:
        return make_tiny_remote(path, arch, seed=seed)
    return make_tiny_hf(path, arch, seed=seed)


@pytest.fixture(scope="module", params=HF_ARCHS + REMOTE_ARCHS)
def converted(request, tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny(root / "model", request.param, seed=3)
    cal = write_parquet(root / "cal.parquet")
    rc = main(["-i", str(src), "-o", str(root / "work"), "-cf", str(root / "out"), "-c", str(cal), *ARGS])
    assert rc == 0
    return request.param, src, root / "out"


def expected_names(cfg, index) -> dict[str, tuple[int, ...] | None]:
    """Output name -> shape (None: a quantized linear's tensors, checked by decoding)."""
    h = cfg.hidden_size
    norms = [arch_mod.final_norm_tensor(cfg)] + [n for i in range(cfg.num_layers) for part in ("attn", "mlp")
                                                 for n in arch_mod.norm_tensors(cfg, i, part)]
    out = {arch_mod.embedding_tensor(cfg): (cfg.vocab_size, h)}
    if arch_mod.position_tensor(cfg):
        out[arch_mod.position_tensor(cfg)] = (cfg.max_position_embeddings, h)
    for name in norms:
        out[name] = (h,)
        if arch_mod.norm_bias_tensor(cfg, name):
            out[arch_mod.norm_bias_tensor(cfg, name)] = (h,)
    for i in range(cfg.num_layers):
        q_norm, k_norm = arch_mod.head_norm_tensors(cfg, i) or (None, None)
        if q_norm:
            out[q_norm] = (cfg.num_heads, cfg.head_dim)
            out[k_norm] = (cfg.num_kv_heads, cfg.head_dim)
        for spec in layer_linears(cfg, i).values():
            out |= {f"{spec.name}.{k}": None for k in LINEAR_KEYS if k != "bias" or spec.bias}
    out |= {f"{arch_mod.head_spec(cfg, index).name}.{k}": None for k in LINEAR_KEYS if k != "bias"}
    out |= {n: index.shape(n) for n in arch_mod.extra_tensors(cfg, index)}
    return {arch_mod.output_name(cfg, name): shape for name, shape in out.items()}


def unquantized_sources(cfg, index) -> dict[str, str]:
    """Output name -> the source tensor each unquantized output tensor is copied from."""
    final = arch_mod.final_norm_tensor(cfg)
    names = [arch_mod.embedding_tensor(cfg), arch_mod.position_tensor(cfg), final, arch_mod.norm_bias_tensor(cfg, final)]
    for i in range(cfg.num_layers):
        for part in ("attn", "mlp"):
            names += list(arch_mod.norm_weights(cfg, i, part).values())
            names.append(arch_mod.router_tensor(cfg, i))
    names += arch_mod.extra_tensors(cfg, index)
    return {arch_mod.output_name(cfg, n): n for n in names if n}


def test_output_names_and_shapes(converted):
    arch, src, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    want = expected_names(cfg, index)
    assert set(tensors) == set(want)
    for name, shape in want.items():
        if shape is not None:
            assert tuple(tensors[name].shape) == shape, name
    fused = [n for n in tensors if "qkv_proj" in n or "gate_up_proj" in n]
    assert not fused  # Phi-3 is written under the split names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch_mod.spec_of(cfg).out_arch or arch]
    # ExLlamaV2 reads the RoPE from the older keys, which a transformers 5 source keeps in rope_parameters
    fields = config.get("text_config", config)
    assert fields[arch_mod.spec_of(cfg).exllamav2_eps_key] == cfg.norm_eps  # Starcoder2's norm_epsilon
    if arch_mod.spec_of(cfg).rope_style != "none":
        assert fields["rope_theta"] == cfg.rope_theta
    assert fields.get("partial_rotary_factor", 1.0) == cfg.partial_rotary_factor
    # ExLlamaV2 0.3.2 asserts that a rope_scaling names its type once, under "type" or "rope_type"
    scaling = fields.get("rope_scaling") or {}
    assert not ("type" in scaling and "rope_type" in scaling), scaling
    if arch_mod.spec_of(cfg).rope_sliding_only:  # Cohere2: the layer kinds in the key ExLlamaV2 reads
        assert fields["sliding_window_pattern"] == 2


def test_gemma3_text_model_is_written_as_exllamav2s_gemma3(tmp_path):
    """ExLlamaV2 0.3.2 has no Gemma3ForCausalLM: the output takes the layout its
    Gemma3ForConditionalGeneration path reads (exl2conv.model.exllamav2_config), and our own
    reader of that layout (load_config) finds the source's language model in it."""
    pytest.importorskip("transformers")
    src = make_tiny_hf(tmp_path / "model", "Gemma3ForCausalLM", seed=3)
    cal = write_parquet(tmp_path / "cal.parquet")
    assert main(["-i", str(src), "-o", str(tmp_path / "work"), "-cf", str(tmp_path / "out"), "-c", str(cal),
                 *ARGS]) == 0
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" not in config
    assert config["text_config"]["model_type"] == "gemma3_text" and "rope_parameters" not in config["text_config"]
    assert "quantization_config" in config and "hidden_size" not in config
    source = load_config(src)
    assert config["sliding_window_pattern"] == next(i + 1 for i, s in enumerate(source.sliding_layers) if not s)
    nested = load_config(out)
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "rope_theta",
                  "rope_scaling", "rope_local_theta", "sliding_layers", "attn_scale", "final_softcap",
                  "eos_token_ids", "bos_token_id"):
        assert getattr(nested, field) == getattr(source, field), field
    names = set(read_output(out))
    assert names and all(n.startswith("language_model.") for n in names)
    keys = json.loads((tmp_path / "work" / "measurement.json").read_text())["measurement"]
    assert all(k.startswith("language_model.model.") or k == "language_model.lm_head.linear" for k in keys), keys


def test_a_gemma3_text_model_exllamav2_would_run_wrongly_is_refused(tmp_path, capsys):
    pytest.importorskip("transformers")
    src = make_tiny_hf(tmp_path / "model", "Gemma3ForCausalLM", seed=3)
    raw = json.loads((src / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw["rope_local_base_freq"] = 50_000.0
    (src / "config.json").write_text(json.dumps(raw))
    assert main(["-i", str(src), "-o", str(tmp_path / "work"), "-ml", "128", "-l", "128"]) == 1
    err = capsys.readouterr().err
    assert "runs Gemma3ForCausalLM models at 10000" in err and not (tmp_path / "work").exists()


def test_rows_longer_than_the_learned_positions_are_refused(tmp_path, capsys):
    """GPTBigCode's position table has 256 rows here: -ml 512 is refused before any stage runs."""
    pytest.importorskip("transformers")
    src = make_tiny_hf(tmp_path / "model", "GPTBigCodeForCausalLM", seed=3)
    assert main(["-i", str(src), "-o", str(tmp_path / "work"), "-ml", "512", "-l", "256"]) == 1
    err = capsys.readouterr().err
    assert "-ml 512: GPTBigCodeForCausalLM has learned positions for its first 256 tokens only" in err
    assert not (tmp_path / "work" / "measurement.json").exists()


def tweaked_norms(cfg) -> set[str]:
    """The norms that norm tweaking adjusts (exl2conv.tweak): each module's input norm (not an
    MoE MLP's, which also feeds the router) and the final norm."""
    out = {arch_mod.final_norm_tensor(cfg)}
    for i in range(cfg.num_layers):
        for part in ("attn", "mlp"):
            norms = arch_mod.norm_tensors(cfg, i, part)  # none of its own for a parallel block's MLP
            if norms and (part == "attn" or not cfg.num_experts):
                out.add(norms[0])
    return out


def test_unquantized_tensors_are_the_source_values(converted):
    """Norms (Gemma's without the +1) and their biases, the embedding (without sqrt(hidden); where
    the config scales it, through ExLlamaV2's float16 multiply and divide) and the q/k norms
    (repeated per head) are the source tensors in FP16; vision tensors keep their dtype. The
    tweaked norms are the source's scaled by a few percent at most, in the stored convention."""
    _, src, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    tweaked = tweaked_norms(cfg)
    sources = unquantized_sources(cfg, index)
    moved = 0
    for name, t in tensors.items():
        if name.rsplit(".", 1)[-1] in LINEAR_KEYS:
            continue
        name = sources[name]
        ref = index.get(name, dtype=index.source_dtype(name))
        if t.dim() == 2 and ref.dim() == 1:
            ref = ref.expand(t.shape[0], -1)
        if name == arch_mod.embedding_tensor(cfg) and cfg.embedding_multiplier != 1.0:
            ref = (ref.half() * cfg.embedding_multiplier) / cfg.embedding_multiplier
        if any(name.startswith(p) for p in arch_mod.ARCHS[cfg.arch].extra_prefixes):
            assert t.dtype == ref.dtype
        else:
            assert t.dtype == torch.float16
        if name in tweaked:
            eff, eff_ref = t.float() + cfg.norm_offset, ref.float() + cfg.norm_offset
            assert ((eff - eff_ref).abs() <= 0.1 * eff_ref.abs() + 1e-3).all(), name
            moved += not torch.equal(t, ref.to(t.dtype))
        else:
            assert torch.equal(t, ref.to(t.dtype)), name
    assert moved >= len(tweaked) // 2  # the tweak did act


def test_decoded_weights_are_close(converted):
    _, src, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    specs = [s for i in range(cfg.num_layers) for s in layer_linears(cfg, i).values()]
    specs.append(arch_mod.head_spec(cfg, index))
    errs = {}
    for spec in specs:
        name = arch_mod.output_name(cfg, spec.name)
        packed = {k: tensors[f"{name}.{k}"] for k in LINEAR_KEYS if f"{name}.{k}" in tensors}
        w = decode_linear(packed, name).float()[:, : spec.out_features].T
        ref = forward.load_head(index, cfg) if spec.part == "head" else forward.load_linear(index, spec)
        # bound by the layout's fewest bits b: Gaussian weights err ~1.3-2.5 x 2^-b (4 bits ~0.09,
        # 8 bits ~0.01); the solver may give a linear that matters little 2 or 3 bits (GPT-2's)
        bits = int(packed["q_groups"][0::2].min())
        errs[spec.name] = (float((w - ref).norm() / ref.norm()), 3 * 2.0 ** -bits)
        # (the biases: test_mlp_biases_are_stored_in_exllamav2s_runtime_order)
    assert all(err < bound for err, bound in errs.values()), errs


def test_quantized_model_runs_close_to_the_original(converted):
    """The whole quantized model (evaluate reads the EXL2 tensors back) against the source."""
    from exl2conv.evaluate import evaluate

    _, src, out = converted
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    res = evaluate(out, src, ids, device="cpu")
    assert res["kl"] < 0.05, res
    assert res["top1"] > 0.8, res


# -- Mixtral (mixture of experts) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("mixtral")
    src = make_tiny_mixtral(root / "model", seed=3)
    cal = write_parquet(root / "cal.parquet")
    rc = main(["-i", str(src), "-o", str(root / "work"), "-cf", str(root / "out"), "-c", str(cal), *ARGS])
    assert rc == 0
    return src, root / "work", root / "out"


def test_mixtral_output_names_and_shapes(mixtral):
    """Per layer: the norms and the router in FP16 as in the source, then every expert's w1, w3,
    w2 quantized under ExLlamaV2's names (reference 6.8, 6.9)."""
    src, _, out = mixtral
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    want = expected_names(cfg, index)
    routers = [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(cfg.num_layers)]
    want |= {r: (4, 64) for r in routers}
    assert set(tensors) == set(want)
    for name, shape in want.items():
        if shape is not None:
            assert tuple(tensors[name].shape) == shape, name
    experts = {n.split(".experts.")[1].rsplit(".", 1)[0] for n in tensors if ".experts." in n}
    assert experts == {f"{j}.{s}" for j in range(4) for s in ("w1", "w3", "w2")}
    for name in routers + arch_mod.norm_tensors(cfg, 1, "mlp"):
        assert tensors[name].dtype == torch.float16
        assert torch.equal(tensors[name], index.get(name, dtype=torch.float16)), name


def check_moe_measurement(src, work, experts: int) -> None:
    """One key per MoE block, ``<layer>.block_sparse_moe`` (whatever the checkpoint calls the block),
    with the MLP table's 17 rows under the names w1, w3, w2; each row's choice applies to all
    ``experts``, so its total_bits is the sum over the experts; the strategy names the same keys."""
    cfg = load_config(src)
    doc = json.loads((work / "measurement.json").read_text())
    keys = [f"model.layers.{i}.{m}" for i in range(cfg.num_layers) for m in ("self_attn", "block_sparse_moe")]
    assert list(doc["measurement"]) == keys + ["model.norm.norm", "lm_head.linear"]
    assert doc["last_module_idx"] == 2 * cfg.num_layers + 2
    h, inter = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.num_layers):
        entries = doc["measurement"][f"model.layers.{i}.block_sparse_moe"]
        assert len(entries) == 17
        for e, row in zip(entries, MLP_OPTIONS):
            assert set(e) == {"accuracy", "total_bits", "w1", "w3", "w2"}
            q = {s: QParams.from_dict(e[s]) for s in ("w1", "w3", "w2")}
            assert [q[s].desc for s in ("w1", "w3", "w2")] == [p.desc for p in row]
            per_expert = (q["w1"].total_bits(h, inter) + q["w3"].total_bits(h, inter)
                          + q["w2"].total_bits(inter, h))
            assert e["total_bits"] == experts * per_expert
            assert 0.5 < e["accuracy"] <= 1.0
    job = json.loads((work / "job.json").read_text())
    assert set(job["strategy"]) == set(keys)


def test_mixtral_measurement(mixtral):
    src, work, _ = mixtral
    check_moe_measurement(src, work, experts=4)


def _decoded(cfg, index, tensors) -> dict[str, torch.Tensor]:
    """Source tensor name -> the weight its quantized linear decodes to, HF [out, in] float32."""
    specs = [s for i in range(cfg.num_layers) for s in layer_linears(cfg, i).values()]
    specs.append(arch_mod.head_spec(cfg, index))
    out = {}
    for spec in specs:
        name = arch_mod.output_name(cfg, spec.name)
        packed = {k: tensors[f"{name}.{k}"] for k in LINEAR_KEYS if f"{name}.{k}" in tensors}
        w = decode_linear(packed, name).float()[:, : spec.out_features].T.contiguous()
        if spec.transposed:  # stored [in, out] (GPT-2's Conv1D): kept [out, in] until the end
            w = w.T
        if spec.in_rows:  # an expert's w2 block of DBRX's fused [E*I, H] stack, stored [in, out]
            whole = out.setdefault(spec.tensor, index.get(spec.tensor).clone())
            whole[spec.in_rows[0]:spec.in_rows[1]] = w.T
        elif spec.rows:  # a part of a fused source (Phi-3's qkv_proj, gate_up_proj): its rows of the whole
            whole = out.setdefault(spec.tensor, index.get(spec.tensor).clone())
            rows = torch.cat([torch.arange(a, b) for a, b in spec.rows])
            if spec.transposed:
                whole[:, rows] = w
            else:
                whole[rows] = w
        else:
            out[spec.tensor] = w.contiguous()
    return out


def test_mixtral_decoded_weights_are_close(mixtral):
    src, _, out = mixtral
    cfg, index = load_config(src), WeightIndex(src)
    decoded = _decoded(cfg, index, read_output(out))
    assert len(decoded) == cfg.num_layers * (4 + 4 * 3) + 1
    errs = {name: float((w - index.get(name)).norm() / index.get(name).norm()) for name, w in decoded.items()}
    assert max(errs.values()) < 0.15, errs
    assert sum(errs.values()) / len(errs) < 0.07, errs


class _Swapped:
    """A WeightIndex whose quantized linears read as their decoded EXL2 weights."""

    def __init__(self, index: WeightIndex, decoded: dict[str, torch.Tensor]):
        self.index, self.decoded = index, decoded

    def get(self, name, dtype=torch.float32, device=None, rows=None):
        if name in self.decoded:
            w = self.decoded[name]
            w = w if rows is None else torch.cat([w[a:b] for a, b in rows])
            return w.to(device=device, dtype=dtype)
        return self.index.get(name, dtype=dtype, device=device, rows=rows)

    def __getattr__(self, attr):
        return getattr(self.index, attr)


def test_mixtral_quantized_model_runs_close_to_the_original(mixtral):
    """The whole model on the decoded weights (same routing code) against the source: the
    router is FP16 and the experts ~6 bpw, so next-token distributions stay close."""
    src, _, out = mixtral
    cfg, index = load_config(src), WeightIndex(src)
    quant = _Swapped(index, _decoded(cfg, index, read_output(out)))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    ref = torch.log_softmax(forward.run_model(index, cfg, ids), dim=-1)
    got = torch.log_softmax(forward.run_model(quant, cfg, ids), dim=-1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    assert kl < 0.05 and top1 > 0.8, (kl, top1)
    assert kl > 0  # the decoded weights really were used


def test_measurement_keys_carry_the_architecture_prefix(converted):
    """measurement.json is keyed as ExLlamaV2 keys it (reference 3.7): Gemma3's multimodal
    checkpoint puts "language_model." in front of every module key, and so does a text-only
    Gemma3ForCausalLM, written in that checkpoint's layout."""
    arch, src, out = converted
    cfg = load_config(src)
    p = arch_mod.output_name(cfg, arch_mod.spec_of(cfg).prefix)
    doc = json.loads((out.parent / "work" / "measurement.json").read_text())
    # a learned position table is a module of its own, after the embedding (GPTBigCode)
    spec = arch_mod.spec_of(cfg)
    want = ["model.wpe.pos_emb"] if arch_mod.position_tensor(cfg) else []
    for i in range(cfg.num_layers):
        layer = arch_mod.output_name(cfg, f"{spec.prefix}{spec.layers}.{i}")
        assert layer == f"{p}model.layers.{i}"
        # a parallel block (Cohere) is one module, its two branches' entries under one key
        want += [f"{layer}.parallel_decoder"] if spec.parallel else [f"{layer}.self_attn", f"{layer}.mlp"]
    want += [f"{p}model.norm.norm", f"{p}lm_head.linear"]
    assert list(doc["measurement"]) == want
    assert doc["last_module_idx"] == len(want)
    want = [k for k in want if not k.endswith(".pos_emb")]
    assert doc["measurement"].get("model.wpe.pos_emb", None) is None
    # every entry of a module names exactly its linears: an ungated MLP (Starcoder2) has no gate_proj
    # (a parallel block's: under "attn" and "mlp" of its one entry, as ExLlamaV2 writes them)
    for i in range(cfg.num_layers):
        keys = (want[i], want[i]) if spec.parallel else (want[2 * i], want[2 * i + 1])
        for part, key in zip(("attn", "mlp"), keys):
            shorts = {spec.short for spec in layer_linears(cfg, i, part).values()}
            entries = doc["measurement"][key][part] if spec.parallel else doc["measurement"][key]
            assert len(entries) == (19 if part == "attn" else 17)
            assert all(set(e) - {"accuracy", "total_bits"} == shorts for e in entries), key


def test_mixtral_eval_scores_the_conversion(mixtral, tmp_path):
    """`exl2conv eval` maps the router and every expert's linears (it crashed on Mixtral)."""
    from exl2conv.evaluate import evaluate

    src, _, out = mixtral
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(8))
    res = evaluate(out, src, ids, device="cpu")
    assert 0 < res["kl"] < 0.05 and res["top1"] > 0.8, res


def test_parallel_blocks_count_the_head_in_the_bits_budget(converted):
    """ExLlamaV2's optimizer counts -b over the 2L modules after the embedding, which for a model
    of L parallel blocks (Cohere) take in the final norm and the head: the decoder then gets the
    head's share of bits as well (exllamav2/conversion/optimize.py). Other models: the decoder."""
    from exl2conv.allocation import budget_numel, decoder_numel

    arch, src, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    head = arch_mod.head_spec(cfg, index)
    extra = head.in_features * head.padded_out if arch_mod.spec_of(cfg).parallel else 0
    assert budget_numel(cfg, index) == decoder_numel(cfg) + extra
    job = json.loads((out.parent / "work" / "job.json").read_text())
    decoder_bits = sum(int(e["total_bits"]) for e in job["strategy"].values())
    assert decoder_bits <= int(budget_numel(cfg, index) * job["bits"])
    if extra:  # more than -b over the decoder alone: the head's share went to it
        assert decoder_bits > decoder_numel(cfg) * job["bits"]


def test_mlp_biases_are_stored_in_exllamav2s_runtime_order(converted):
    """A biased dense MLP's gate/up biases are stored in down_proj's q_perm order, the order
    ExLlamaV2 computes those columns in (exl2conv.pack.mlp_bias_to_runtime_order); every other
    bias as the source has it. exl2conv eval's reader gives back the source's biases."""
    from contextlib import ExitStack

    from exl2conv.evaluate import Exl2Weights

    _, src, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    reordered = 0
    with ExitStack() as stack:
        q = Exl2Weights(out, index, stack, rename=lambda name: arch_mod.output_name(cfg, name))
        for i in range(cfg.num_layers):
            specs = layer_linears(cfg, i)
            for short, spec in specs.items():
                if not spec.bias or spec.expert is not None:
                    continue
                source = index.get(spec.bias_tensor, dtype=torch.float16, rows=spec.rows)
                assert torch.equal(q.bias(spec, specs, "cpu").half(), source), spec.name
                stored = tensors[f"{arch_mod.output_name(cfg, spec.name)}.bias"][: spec.out_features]
                if short in ("gate_proj", "up_proj"):
                    assert not torch.equal(stored, source), spec.name
                    reordered += 1
                else:
                    assert torch.equal(stored, source), spec.name
    assert reordered == (cfg.num_layers if cfg.mlp_bias or "up_proj" in arch_mod.spec_of(cfg).always_biased else 0)


@pytest.mark.parametrize("kill", ["module:2", "measurement:2", "module:6"])
def test_a_parallel_block_model_killed_and_rerun_resumes_to_the_same_bytes(tmp_path, kill):
    """Cohere's module list (1 + L + 2 modules, one per parallel block) checkpoints and resumes
    in the measurement and the quantization as a sequential model's does: a SIGKILL, the same
    command again, the bytes of an uninterrupted run."""
    import signal

    from exl2conv import faults
    from tests.e2e.test_resume import digest, run_cli

    pytest.importorskip("transformers")
    src = make_tiny_hf(tmp_path / "model", "CohereForCausalLM", seed=3)
    cal = write_parquet(tmp_path / "cal.parquet")

    def args(root):
        return ["-i", str(src), "-o", str(root / "work"), "-cf", str(root / "out"), "-c", str(cal), *ARGS,
                "-cpi", "0"]

    assert main(args(tmp_path / "ref")) == 0
    killed = run_cli(args(tmp_path / "run"), {faults.ENV: kill})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(args(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming job" in resumed.stdout
    assert digest(tmp_path / "run" / "out") == digest(tmp_path / "ref" / "out")


# -- the runtime (issue 30) -------------------------------------------------------------------------

def test_the_runtime_runs_it(converted, monkeypatch):
    """exl2conv.runtime on the output: logits within 1e-5 of the decoded forward's in float32,
    greedy generate() following it, each check failing on the architecture's wrong variant of the
    loader (tests.runtime_checks); the remote-code families as the transformers classes that
    compute them (exl2conv.runtime.architectures)."""
    pytest.importorskip("transformers")
    from tests.runtime_checks import check_runtime

    arch, _, out = converted
    check_runtime(out, arch, monkeypatch)


def test_the_runtime_runs_mixtral(mixtral, monkeypatch):
    """As above, for Mixtral: each expert's three linears in place of the class's 3D expert tensors."""
    from tests.runtime_checks import check_runtime

    check_runtime(mixtral[2], "MixtralForCausalLM", monkeypatch)
