"""End to end on tiny random models of each added architecture (built and saved by transformers):
convert on the CPU, then check the output tensors' names and shapes against what ExLlamaV2 loads
(reference 6.8, 8) and decode every quantized linear back to weights close to the originals."""

import json

import pytest
import torch
from safetensors import safe_open

from exl2conv.cli import main
from exl2conv.model import WeightIndex, layer_linears, load_config
from exl2conv.model import arch as arch_mod
from exl2conv.pack import LINEAR_KEYS, decode_linear
from tests.tinymodel import HF_ARCHS, make_tiny_hf

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


@pytest.fixture(scope="module", params=HF_ARCHS)
def converted(request, tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny_hf(root / "model", request.param, seed=3)
    cal = write_parquet(root / "cal.parquet")
    rc = main(["-i", str(src), "-o", str(root / "work"), "-cf", str(root / "out"), "-c", str(cal), *ARGS])
    assert rc == 0
    return request.param, src, root / "out"


def expected_names(cfg, index) -> dict[str, tuple[int, ...] | None]:
    """Output name -> shape (None: a quantized linear's tensors, checked by decoding)."""
    h = cfg.hidden_size
    out = {arch_mod.embedding_tensor(cfg): (cfg.vocab_size, h), arch_mod.final_norm_tensor(cfg): (h,)}
    for i in range(cfg.num_layers):
        for part in ("attn", "mlp"):
            out |= {n: (h,) for n in arch_mod.norm_tensors(cfg, i, part)}
        q_norm, k_norm = arch_mod.head_norm_tensors(cfg, i) or (None, None)
        if q_norm:
            out[q_norm] = (cfg.num_heads, cfg.head_dim)
            out[k_norm] = (cfg.num_kv_heads, cfg.head_dim)
        for spec in layer_linears(cfg, i).values():
            out |= {f"{spec.name}.{k}": None for k in LINEAR_KEYS if k != "bias" or spec.bias}
    out |= {f"{arch_mod.head_spec(cfg, index).name}.{k}": None for k in LINEAR_KEYS if k != "bias"}
    out |= {n: index.shape(n) for n in arch_mod.extra_tensors(cfg, index)}
    return out


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
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]


def test_unquantized_tensors_are_the_source_values(converted):
    """Norms (Gemma's without the +1), the embedding (without sqrt(hidden)) and the q/k norms
    (repeated per head) are the source tensors in FP16; vision tensors keep their dtype."""
    _, src, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    for name, t in tensors.items():
        if name.rsplit(".", 1)[-1] in LINEAR_KEYS:
            continue
        ref = index.get(name, dtype=index.source_dtype(name))
        if t.dim() == 2 and ref.dim() == 1:
            ref = ref.expand(t.shape[0], -1)
        if any(name.startswith(p) for p in arch_mod.ARCHS[cfg.arch].extra_prefixes):
            assert t.dtype == ref.dtype
        else:
            assert t.dtype == torch.float16
        assert torch.equal(t, ref.to(t.dtype)), name


def test_decoded_weights_are_close(converted):
    _, src, out = converted
    cfg, index = load_config(src), WeightIndex(src)
    tensors = read_output(out)
    specs = [s for i in range(cfg.num_layers) for s in layer_linears(cfg, i).values()]
    specs.append(arch_mod.head_spec(cfg, index))
    errs = {}
    for spec in specs:
        packed = {k: tensors[f"{spec.name}.{k}"] for k in LINEAR_KEYS if f"{spec.name}.{k}" in tensors}
        w = decode_linear(packed, spec.name).float()[:, : spec.out_features].T
        ref = index.get(spec.tensor, rows=spec.rows)
        errs[spec.name] = float((w - ref).norm() / ref.norm())
        if spec.bias:
            bias = tensors[f"{spec.name}.bias"][: spec.out_features]
            assert torch.equal(bias, index.get(spec.bias_tensor, dtype=torch.float16))
    # ~6 bpw on Gaussian weights: the solver spends bits unevenly (4-bit linears err ~0.09, 8-bit ~0.01)
    assert max(errs.values()) < 0.15, errs
    assert sum(errs.values()) / len(errs) < 0.07, errs


def test_quantized_model_runs_close_to_the_original(converted):
    """The whole quantized model (evaluate reads the EXL2 tensors back) against the source."""
    from exl2conv.evaluate import evaluate

    _, src, out = converted
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    res = evaluate(out, src, ids, device="cpu")
    assert res["kl"] < 0.05, res
    assert res["top1"] > 0.8, res
