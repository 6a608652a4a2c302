"""A table of bad inputs, each answered by one ` ## Error:` line (what, where, what to do), a
non-zero exit code, no traceback, and an input folder left untouched. Where the job can go on
once the input is fixed, the test resumes it. docs/guarantees.md lists the same cases.

Each case is a function ``case(env) -> (args, expected text in the error line)`` that may break a
copy of the tiny model (``env.model``) or the working folder first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exl2conv import faults
from exl2conv.cli import main
from tests.tinymodel import make_tiny_llama

SMALL = ["-ml", "128", "-l", "128"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture(scope="module")
def measurement(pristine, tmp_path_factory):
    """A measurement of the pristine model (-om), shared by the -m cases."""
    root = tmp_path_factory.mktemp("meas")
    assert main(["-i", str(pristine), "-o", str(root / "w"), "-om", str(root / "m.json"), *SMALL]) == 0
    return root / "m.json"


@dataclass
class Env:
    model: Path      # a private copy of the tiny model, free to break
    work: Path       # -o
    tmp: Path
    measurement: Path | None = None


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def base(env: Env, *extra: str) -> list[str]:
    return ["-i", str(env.model), "-o", str(env.work), *SMALL, *extra]


def rewrite_weights(env: Env, change) -> None:
    """Load model.safetensors, let ``change(tensors)`` edit the dict, save it back."""
    path = env.model / "model.safetensors"
    t = load_file(str(path))
    change(t)
    save_file(t, str(path), metadata={"format": "pt"})


def edit_config(env: Env, **fields) -> None:
    path = env.model / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def parquet(path: Path, column: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(column, type=pa.string())}), path)
    return path


# -- the cases ------------------------------------------------------------------------------------

def config_missing(env):
    (env.model / "config.json").unlink()
    return base(env), "config.json not found"


def config_not_json(env):
    (env.model / "config.json").write_text('{"hidden_size": 64,')
    return base(env), "is not valid JSON"


def config_unreadable(env):
    (env.model / "config.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    return base(env), "cannot be read"


def config_not_an_object(env):
    (env.model / "config.json").write_text("[1, 2, 3]")
    return base(env), "must hold a JSON object"


def config_field_missing(env):
    edit_config(env, hidden_size=None)
    return base(env), "required field 'hidden_size' is missing"


def unknown_architecture(env):
    edit_config(env, architectures=["FalconForCausalLM"])
    return base(env), "'FalconForCausalLM', which exl2conv does not support"


def no_weights(env):
    (env.model / "model.safetensors").unlink()
    return base(env), "has no *.safetensors weight files"


def only_pytorch_bin(env):
    (env.model / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, env.model / "pytorch_model.bin")
    return base(env), "exl2conv to-safetensors"


def truncated_safetensors(env):
    path = env.model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return base(env), "is truncated"


def corrupt_safetensors_length(env):
    path = env.model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    return base(env), "is not a safetensors file"


def corrupt_safetensors_header(env):
    path = env.model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32
    path.write_bytes(bytes(data))
    return base(env), "corrupt safetensors header"


def index_names_missing_shard(env):
    shutil.rmtree(env.model)
    make_tiny_llama(env.model, seed=1, shards=2)
    (env.model / "model-00002-of-00002.safetensors").unlink()
    return base(env), "names shard 'model-00002-of-00002.safetensors', which is missing"


def index_corrupt(env):
    shutil.rmtree(env.model)
    make_tiny_llama(env.model, seed=1, shards=2)
    (env.model / "model.safetensors.index.json").write_text("{}")
    return base(env), "is not a valid index"


def tensor_missing(env):
    rewrite_weights(env, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return base(env), "tensor 'model.layers.1.mlp.up_proj.weight' is missing"


def tensor_wrong_shape(env):
    def change(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16].clone()
    rewrite_weights(env, change)
    return base(env), "has shape [16, 64], but config.json implies [32, 64]"


def tensor_int_dtype(env):
    def change(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
    rewrite_weights(env, change)
    return base(env), "only float16, bfloat16 and float32"


def nan_in_weights(env):
    def change(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    rewrite_weights(env, change)
    return base(env), "'model.layers.0.mlp.up_proj.weight' in"


def inf_in_embeddings(env):
    def change(t):
        t["model.embed_tokens.weight"][10, 0] = float("inf")
    rewrite_weights(env, change)
    return base(env), "holds NaN or Inf values"


def inf_in_calibration_states(env):
    """Finite float32 weights whose product overflows: silu(gate) * up ~ 1e40 > float32's max."""
    shutil.rmtree(env.model)
    make_tiny_llama(env.model, seed=1, dtype=torch.float32)

    def change(t):
        t["model.layers.0.mlp.gate_proj.weight"] *= 1e20
        t["model.layers.0.mlp.up_proj.weight"] *= 1e20
    rewrite_weights(env, change)
    return base(env), "model.layers.0.mlp output: the calibration states hold NaN or Inf"


def nan_in_checkpoint_states(env):
    """A job stopped (Ctrl-C) after two modules, then its states file damaged."""
    mp = pytest.MonkeyPatch()
    mp.setenv(faults.ENV, "module:2:sigint")
    faults.reset()
    try:
        assert main(base(env, "-cpi", "0")) == 130
    finally:
        mp.undo()
        faults.reset()
    states = json.loads((env.work / "job.json").read_text())["checkpoint"]["file"]
    bad = load_file(str(env.work / states))
    bad["hidden_states"][0, 0, 0] = float("nan")
    save_file(bad, str(env.work / states))
    return base(env, "-cpi", "0"), "checkpointed calibration states hold NaN or Inf"


def parquet_empty_file(env):
    (env.tmp / "cal.parquet").write_bytes(b"")
    return base(env, "-c", str(env.tmp / "cal.parquet")), "not a readable parquet file"


def parquet_not_parquet(env):
    (env.tmp / "cal.parquet").write_text("just some text, not parquet")
    return base(env, "-c", str(env.tmp / "cal.parquet")), "not a readable parquet file"


def parquet_no_rows(env):
    return base(env, "-c", str(parquet(env.tmp / "cal.parquet", []))), "has no rows"


def parquet_textless(env):
    return base(env, "-c", str(parquet(env.tmp / "cal.parquet", ["", None, ""]))), "holds no text"


def parquet_tiny(env):
    return base(env, "-c", str(parquet(env.tmp / "cal.parquet", ["a few words"]))), "not enough text"


def parquet_missing(env):
    return base(env, "-c", str(env.tmp / "nowhere.parquet")), "calibration dataset not found"


def length_not_multiple_of_128(env):
    return ["-i", str(env.model), "-o", str(env.work), "-ml", "100", "-l", "128"], "-ml 100: the built-in"


def bits_below_reach(env):
    return base(env, "-m", str(env.measurement), "-b", "1.0"), "choose -b in that range"


def bits_above_reach(env):
    return base(env, "-m", str(env.measurement), "-b", "9.0"), "choose -b in that range"


def bits_not_positive(env):
    return base(env, "-b", "-2"), "give a positive number of bits"


def head_bits_invalid(env):
    return base(env, "-hb", "7"), "-hb 7 is not a head layout"


def out_equals_in(env):
    return ["-i", str(env.model), "-o", str(env.model), *SMALL], "inside (or equal to) the input folder"


def out_inside_in(env):
    return ["-i", str(env.model), "-o", str(env.model / "work"), *SMALL], "inside (or equal to) the input folder"


def cf_equals_in(env):
    return base(env, "-cf", str(env.model)), "-cf"


def cf_is_a_file(env):
    (env.tmp / "file.txt").write_text("x")
    return base(env, "-cf", str(env.tmp / "file.txt")), "exists and is not a folder"


def om_with_cf(env):
    return base(env, "-om", str(env.tmp / "m.json"), "-cf", str(env.tmp / "out")), "cannot be combined"


def no_resume_on_foreign_folder(env):
    env.work.mkdir()
    (env.work / "thesis.tex").write_text("years of work")
    return base(env, "-nr"), "holds files but no exl2conv job"


def foreign_folder_without_nr(env):
    env.work.mkdir()
    (env.work / "thesis.tex").write_text("years of work")
    return base(env), "already holds files that are not an exl2conv job"


def out_is_a_file(env):
    env.work.write_text("not a folder")
    return base(env), "is a file, not a folder"


def out_under_a_file(env):
    (env.tmp / "afile").write_text("x")
    return ["-i", str(env.model), "-o", str(env.tmp / "afile" / "work"), *SMALL], "cannot create the working folder"


def out_unwritable(env):
    """The folder exists but refuses writes (simulated: tests may run as root)."""
    import tempfile

    env.work.mkdir()
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve() == env.work.resolve():
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)
    env.monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return base(env), "cannot write"


def job_json_corrupt(env):
    env.work.mkdir()
    (env.work / "job.json").write_text('{"tool": "exl2conv", "progress": "measure_qu')
    return base(env), "is unreadable or corrupt"


def job_json_foreign(env):
    env.work.mkdir()
    (env.work / "job.json").write_text('{"name": "some other tool"}')
    return base(env), "was not written by exl2conv"


def job_json_unknown_stage(env):
    env.work.mkdir()
    (env.work / "job.json").write_text('{"tool": "exl2conv", "progress": "teleport"}')
    return base(env), "unknown stage 'teleport'"


def measurement_json_corrupt_in_job(env):
    """A job stopped at optimize (bad -b), then its measurement.json damaged."""
    assert main(base(env, "-m", str(env.measurement), "-b", "9.0")) == 1
    (env.work / "measurement.json").write_text('{"measurement": {"model.layers.0')
    return base(env, "-m", str(env.measurement), "-b", "4.0"), "measurement.json is corrupt"


def measurement_file_corrupt(env):
    (env.tmp / "m.json").write_text("{ not json")
    return base(env, "-m", str(env.tmp / "m.json")), "not a readable measurement.json"


def measurement_file_not_a_measurement(env):
    (env.tmp / "m.json").write_text('{"hello": 1}')
    return base(env, "-m", str(env.tmp / "m.json")), "not a measurement file"


def measurement_file_missing(env):
    return base(env, "-m", str(env.tmp / "none.json")), "no such file"


def measurement_of_another_model(env):
    other = make_tiny_llama(env.tmp / "other", seed=1, hidden=96, intermediate=192)
    assert main(["-i", str(other), "-o", str(env.tmp / "w2"), "-om", str(env.tmp / "other.json"), *SMALL]) == 0
    return base(env, "-m", str(env.tmp / "other.json")), "made for another model"


def measurement_of_another_model_forced(env):
    """--force-measurement skips the fingerprint; the shape check still refuses it."""
    other = make_tiny_llama(env.tmp / "other", seed=1, hidden=96, intermediate=192)
    assert main(["-i", str(other), "-o", str(env.tmp / "w2"), "-om", str(env.tmp / "other.json"), *SMALL]) == 0
    return base(env, "-m", str(env.tmp / "other.json"), "--force-measurement"), "does not fit this model's shapes"


def resume_with_other_arguments(env):
    assert main(base(env, "-m", str(env.measurement), "-b", "9.0")) == 1  # a job stopped at optimize
    return ["-i", str(env.model), "-o", str(env.work), "-ml", "128", "-l", "256", "-m", str(env.measurement)], \
        "-l: saved 128, given 256"


def model_changed_since_job_started(env):
    assert main(base(env, "-m", str(env.measurement), "-b", "9.0")) == 1

    def change(t):
        t["model.norm.weight"] = t["model.norm.weight"].float()
    rewrite_weights(env, change)
    return ["-o", str(env.work)], "is not the one this job started with"


def nothing_to_resume(env):
    return ["-o", str(env.work)], "no job to resume"


def out_dir_not_given(env):
    return ["-i", str(env.model)], "-o WORKDIR is required"


def input_folder_missing(env):
    return ["-i", str(env.tmp / "nowhere"), "-o", str(env.work)], "no such folder"


def tokenizer_missing(env):
    (env.model / "tokenizer.json").unlink()
    (env.model / "tokenizer_config.json").unlink()
    return base(env), "no tokenizer found"


def shard_size_negative(env):
    return base(env, "-ss", "-1"), "cannot be negative"


def shard_size_below_a_tensor(env):
    # the tiny model's embedding is 0.0315 MB: the message gives its size and an -ss that fits it
    return base(env, "-ss", "0.02"), ("model.embed_tokens.weight (0.0315 MB) is larger than the shard size; "
                                      "raise -ss to at least 0.04")


def om_with_m(env):
    return base(env, "-om", str(env.tmp / "m.json"), "-m", str(env.measurement)), "copy the measurement file instead"


def input_is_a_file(env):
    return ["-i", str(env.model / "config.json"), "-o", str(env.work), *SMALL], "is a file, not a folder"


def states_env_invalid(env):
    env.monkeypatch.setenv("EXL2CONV_STATES", "vram")  # type: ignore[attr-defined]
    return base(env), "EXL2CONV_STATES=vram: give auto, gpu or host"


def grad_attention_env_invalid(env):
    env.monkeypatch.setenv("EXL2CONV_GRAD_ATTENTION", "flash")  # type: ignore[attr-defined]
    return base(env), "EXL2CONV_GRAD_ATTENTION=flash: give blocked or math"


CASES = [config_missing, config_not_json, config_unreadable, config_not_an_object, config_field_missing,
         unknown_architecture, no_weights, only_pytorch_bin, truncated_safetensors, corrupt_safetensors_length,
         corrupt_safetensors_header, index_names_missing_shard, index_corrupt, tensor_missing, tensor_wrong_shape,
         tensor_int_dtype, nan_in_weights, inf_in_embeddings, inf_in_calibration_states, nan_in_checkpoint_states,
         parquet_empty_file, parquet_not_parquet, parquet_no_rows, parquet_textless, parquet_tiny, parquet_missing,
         length_not_multiple_of_128, bits_below_reach, bits_above_reach, bits_not_positive, head_bits_invalid,
         out_equals_in, out_inside_in, cf_equals_in, cf_is_a_file, om_with_cf, no_resume_on_foreign_folder,
         foreign_folder_without_nr, out_is_a_file, out_under_a_file, out_unwritable, job_json_corrupt,
         job_json_foreign, job_json_unknown_stage, measurement_json_corrupt_in_job, measurement_file_corrupt,
         measurement_file_not_a_measurement, measurement_file_missing, measurement_of_another_model,
         measurement_of_another_model_forced, resume_with_other_arguments, model_changed_since_job_started,
         nothing_to_resume, out_dir_not_given, input_folder_missing, tokenizer_missing, shard_size_negative,
         states_env_invalid, grad_attention_env_invalid, shard_size_below_a_tensor, om_with_m, input_is_a_file]


def run_case(case, pristine, measurement, tmp_path, monkeypatch, capsys) -> tuple[Env, str]:
    model = tmp_path / "model"
    shutil.copytree(pristine, model)
    env = Env(model, tmp_path / "work", tmp_path, measurement)
    env.monkeypatch = monkeypatch  # type: ignore[attr-defined]
    args, expected = case(env)
    capsys.readouterr()
    before = tree_hash(model) if model.is_dir() else None
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1, (rc, err[-2000:])
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(" ## ")]
    assert len(lines) == 1 and lines[0].startswith(" ## Error: "), err[-2000:]
    assert expected in lines[0], lines[0]
    if before is not None:
        assert tree_hash(model) == before, "the input folder changed"
    return env, lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_clear_line(case, pristine, measurement, tmp_path, monkeypatch, capsys):
    run_case(case, pristine, measurement, tmp_path, monkeypatch, capsys)


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_foreign_folder_is_untouched_by_nr(pristine, measurement, tmp_path, monkeypatch, capsys):
    env, _ = run_case(no_resume_on_foreign_folder, pristine, measurement, tmp_path, monkeypatch, capsys)
    assert [p.name for p in env.work.iterdir()] == ["thesis.tex"]


def test_bad_bits_then_good_bits_resumes_without_measuring_again(pristine, measurement, tmp_path, monkeypatch,
                                                                 capsys):
    """-b out of reach is refused before any stage runs; the same command with a reachable -b goes on."""
    env, line = run_case(bits_above_reach, pristine, measurement, tmp_path, monkeypatch, capsys)
    assert "bits per weight" in line
    assert json.loads((env.work / "job.json").read_text())["progress"] == "begin"
    assert main(base(env, "-m", str(env.measurement), "-b", "4.0")) == 0
    assert (env.work / "output.safetensors").is_file()


def test_fixed_model_resumes_after_nan_weights(pristine, measurement, tmp_path, monkeypatch, capsys):
    """NaN weights stop the job when the layer is read; with the model restored (same
    fingerprint) the same command resumes and finishes."""
    env, _ = run_case(nan_in_weights, pristine, measurement, tmp_path, monkeypatch, capsys)
    shutil.copyfile(pristine / "model.safetensors", env.model / "model.safetensors")
    assert main(base(env)) == 0
    assert (env.work / "output.safetensors").is_file()


def test_exllamav2_measurement_without_fingerprint_is_accepted(pristine, measurement, tmp_path):
    data = json.loads(measurement.read_text())
    assert len(data["exl2conv"]["model_fingerprint"]) == 64
    plain = {"measurement": data["measurement"], "last_module_idx": data["last_module_idx"]}
    (tmp_path / "m.json").write_text(json.dumps(plain))
    out = tmp_path / "out"
    assert main(["-i", str(pristine), "-o", str(tmp_path / "w"), "-m", str(tmp_path / "m.json"), "-cf", str(out),
                 *SMALL]) == 0
    assert (out / "output.safetensors").is_file()


def test_force_measurement_accepts_a_same_shape_model(pristine, measurement, tmp_path, capsys):
    """Same shapes, other dtype: another fingerprint. Refused, then accepted with the flag."""
    other = make_tiny_llama(tmp_path / "other", seed=2, dtype=torch.bfloat16)
    args = ["-i", str(other), "-o", str(tmp_path / "w"), "-m", str(measurement), *SMALL]
    assert main(args) == 1
    assert "--force-measurement" in capsys.readouterr().err
    assert main([*args, "--force-measurement"]) == 0
    assert (tmp_path / "w" / "output.safetensors").is_file()


def test_job_and_measurement_carry_fingerprints(pristine, measurement, tmp_path):
    data = json.loads(measurement.read_text())
    block = data["exl2conv"]
    assert block["calibration"] == {"dataset": "(default)", "measurement_rows": 19, "measurement_length": 128,
                                    "rope_scale": None, "rope_alpha": None}
    job = json.loads((measurement.parent / "w" / "job.json").read_text())
    assert job["fingerprint"]["model"] == block["model_fingerprint"]
