"""The vision-language models end to end on the CPU (Qwen2-VL, Qwen2.5-VL, Llava with a Pixtral
tower, Mistral 3; tests.tinyvl): the language model is quantized (test_architectures checks it as
every architecture's), and everything else is copied into the output byte for byte under the names
ExLlamaV2 0.3.2 reads, with the processor files and a config.json it loads; a checkpoint under
transformers' in-memory names (exl2conv.model.layouts) converts to the same output. The byte check is shown to fail on
an output whose vision tensor was altered by one bit."""

import json

import pytest
import torch
from safetensors.torch import save_file

from exl2conv.cli import main
from exl2conv.model import WeightIndex, load_config
from tests.e2e.test_architectures import ARGS, read_output, write_parquet
from tests.tinymodel import make_tiny_hf
from tests.tinyvl import MROPE, VL_ARCHS

# Module keys of layer 0 and the head, as ExLlamaV2 writes them (its lm_prefix in front)
LM_PREFIX = {"Qwen2VLForConditionalGeneration": "", "Qwen2_5_VLForConditionalGeneration": "",
             "LlavaForConditionalGeneration": "language_model.", "Mistral3ForConditionalGeneration": "language_model."}
VISION_PREFIXES = {"Qwen2VLForConditionalGeneration": ("visual.",), "Qwen2_5_VLForConditionalGeneration": ("visual.",),
                   "LlavaForConditionalGeneration": ("vision_tower.", "multi_modal_projector."),
                   "Mistral3ForConditionalGeneration": ("vision_tower.", "multi_modal_projector.")}


@pytest.fixture(scope="module", params=VL_ARCHS)
def converted(request, tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny_hf(root / "model", request.param, seed=3)
    cal = write_parquet(root / "cal.parquet")
    assert main(["-i", str(src), "-o", str(root / "work"), "-cf", str(root / "out"), "-c", str(cal), *ARGS]) == 0
    return request.param, src, root


def source_tensors(src) -> dict[str, torch.Tensor]:
    index = WeightIndex(src)
    return {name: index.get(name, dtype=index.source_dtype(name)) for name in index.entries}


def vision_mismatches(arch: str, source: dict, output: dict) -> list[str]:
    """What differs between the source's tensors outside the language model and the output's:
    a name only one side has, or a dtype, shape or byte that differs. Empty: copied bit for bit."""
    prefixes = VISION_PREFIXES[arch]
    ours = {n for n in output if n.startswith(prefixes)}
    theirs = {n for n in source if n.startswith(prefixes)}
    problems = [f"{n}: only in the output" for n in sorted(ours - theirs)]
    problems += [f"{n}: missing from the output" for n in sorted(theirs - ours)]
    for n in sorted(ours & theirs):
        a, b = output[n], source[n]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{n}: {a.dtype} {tuple(a.shape)} against {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            problems.append(f"{n}: bytes differ")
    return problems


def test_vision_tensors_are_the_sources_bit_for_bit(converted):
    arch, src, root = converted
    source, output = source_tensors(src), read_output(root / "out")
    assert not vision_mismatches(arch, source, output)
    n_vision = sum(n.startswith(VISION_PREFIXES[arch]) for n in source)
    assert n_vision >= 15
    # the rest of the output is the language model, under ExLlamaV2's lm_prefix
    p = LM_PREFIX[arch]
    rest = [n for n in output if not n.startswith(VISION_PREFIXES[arch])]
    assert all(n.startswith(f"{p}model.") or n.startswith(f"{p}lm_head.") for n in rest)
    assert f"{p}model.layers.0.self_attn.q_proj.q_weight" in output and f"{p}lm_head.q_weight" in output


def test_the_check_fails_on_one_altered_bit(converted, tmp_path):
    """The same output with the lowest bit of one vision tensor's first byte flipped, and with one
    vision tensor left out: each is reported."""
    arch, src, root = converted
    source, output = source_tensors(src), read_output(root / "out")
    name = sorted(n for n in output if n.startswith(VISION_PREFIXES[arch]))[-1]
    t = output[name]
    flipped = t.reshape(-1).view(torch.uint8).clone()
    flipped[0] ^= 1
    altered = dict(output, **{name: flipped.view(t.dtype).reshape(t.shape)})
    save_file(altered, str(tmp_path / "output.safetensors"))
    assert vision_mismatches(arch, source, read_output(tmp_path)) == [f"{name}: bytes differ"]
    del altered[name]
    assert vision_mismatches(arch, source, altered) == [f"{name}: missing from the output"]


def test_measurement_keys_carry_exllamav2s_lm_prefix(converted):
    arch, src, root = converted
    p = LM_PREFIX[arch]
    keys = list(json.loads((root / "work" / "measurement.json").read_text())["measurement"])
    layers = load_config(src).num_layers
    assert keys == [f"{p}model.layers.{i}.{m}" for i in range(layers) for m in ("self_attn", "mlp")] + \
        [f"{p}model.norm.norm", f"{p}lm_head.linear"]


def test_processor_files_and_the_config_exllamav2_reads(converted):
    """The processor files are copied as they are; config.json keeps the source's, plus what
    ExLlamaV2 0.3.2 requires at load and transformers 5 writes elsewhere (exllamav2_config)."""
    arch, src, root = converted
    out = root / "out"
    for name in ("preprocessor_config.json", "chat_template.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    config, source = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert config["architectures"] == [arch] and "quantization_config" in config
    text, vision = config["text_config"], config["vision_config"]
    assert text["rope_theta"] == load_config(src).rope_theta
    assert {k: v for k, v in vision.items() if k not in ("rope_theta", "spatial_patch_size")} == source["vision_config"]
    assert vision["rope_theta"] == 10000.0  # transformers 5 keeps it in rope_parameters
    if arch.startswith("Qwen2"):
        assert text["rope_scaling"] == MROPE and vision["spatial_patch_size"] == vision["patch_size"]
    else:
        assert vision["model_type"] == "pixtral" and "vision_feature_layer" in config


@pytest.mark.parametrize("arch", ["LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration"])
def test_a_tower_other_than_pixtral_is_refused(tmp_path, capsys, arch):
    """ExLlamaV2 0.3.2 converts Llava and Mistral 3 with a Pixtral tower only."""
    pytest.importorskip("transformers")
    src = make_tiny_hf(tmp_path / "model", arch, seed=3)
    raw = json.loads((src / "config.json").read_text())
    raw["vision_config"]["model_type"] = "clip_vision_model"
    (src / "config.json").write_text(json.dumps(raw))
    assert main(["-i", str(src), "-o", str(tmp_path / "work"), "-ml", "128", "-l", "128"]) == 1
    err = capsys.readouterr().err
    assert f"{arch} with vision_config.model_type 'clip_vision_model'" in err and "only with a 'pixtral'" in err
    assert "supported: LlamaForCausalLM" in err and not (tmp_path / "work").exists()


# The hub's names -> transformers' in-memory names (exl2conv.model.layouts)
IN_MEMORY = {"LlavaForConditionalGeneration": (("language_model.model.", "model.language_model."),
                                               ("language_model.lm_head.", "lm_head."),
                                               ("vision_tower.", "model.vision_tower."),
                                               ("multi_modal_projector.", "model.multi_modal_projector.")),
             "Qwen2VLForConditionalGeneration": (("model.", "model.language_model."), ("lm_head.", "lm_head."),
                                                 ("visual.", "model.visual."))}


IN_MEMORY["Qwen2_5_VLForConditionalGeneration"] = IN_MEMORY["Qwen2VLForConditionalGeneration"]
IN_MEMORY["Mistral3ForConditionalGeneration"] = IN_MEMORY["LlavaForConditionalGeneration"]


def test_the_in_memory_layout_converts_to_the_hubs_output(converted, tmp_path):
    """The same model saved under transformers' in-memory names converts to the same bytes, names
    and measurement as under the hub's (the fixture's conversion): those ExLlamaV2 reads."""
    import shutil

    arch, hub, root = converted
    moved = tmp_path / "in_memory"
    shutil.copytree(hub, moved)

    def rename(name: str) -> str:
        old, new = next(pair for pair in IN_MEMORY[arch] if name.startswith(pair[0]))
        return new + name.removeprefix(old)
    save_file({rename(n): t for n, t in source_tensors(hub).items()}, str(moved / "model.safetensors"))
    assert load_config(moved).source_layout == "in_memory" and load_config(hub).source_layout == ""
    assert main(["-i", str(moved), "-o", str(tmp_path / "work"), "-cf", str(tmp_path / "out"),
                 "-c", str(root / "cal.parquet"), *ARGS]) == 0
    ours, theirs = read_output(tmp_path / "out"), read_output(root / "out")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[n].reshape(-1).view(torch.uint8), theirs[n].reshape(-1).view(torch.uint8)) for n in ours)
    doc = [json.loads((work / "measurement.json").read_text())["measurement"] for work in (tmp_path / "work", root / "work")]
    assert doc[0] == doc[1]


@pytest.mark.slow
def test_a_job_with_noise_rows_killed_and_rerun_resumes_to_the_same_bytes(tmp_path):
    """Qwen2-VL on the built-in set, whose quantization rows end with 30 noise rows: killed after the
    quantization's first module, before its checkpoint, so that the resume embeds the rows again
    (from the saved ids and statistics); the output is an uninterrupted run's, byte for byte."""
    import signal

    from exl2conv import faults
    from tests.e2e.test_resume import digest, run_cli

    pytest.importorskip("transformers")
    src = make_tiny_hf(tmp_path / "model", "Qwen2VLForConditionalGeneration", seed=3)

    def args(root):
        return ["-i", str(src), "-o", str(root / "work"), "-cf", str(root / "out"), "-ml", "128", "-l", "128",
                "-b", "5.0", "-cpi", "0"]

    assert main(args(tmp_path / "ref")) == 0
    rows = json.loads((tmp_path / "ref" / "out" / "config.json").read_text())["quantization_config"]["calibration"]
    assert rows["rows"] == 115 + 30
    killed = run_cli(args(tmp_path / "run"), {faults.ENV: "module:7"})  # measurement: modules 1-6
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "Quantizing" in killed.stdout
    resumed = run_cli(args(tmp_path / "run"))
    assert resumed.returncode == 0 and "Resuming job" in resumed.stdout, resumed.stderr[-2000:]
    assert digest(tmp_path / "run" / "out") == digest(tmp_path / "ref" / "out")
