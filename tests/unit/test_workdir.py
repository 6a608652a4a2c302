"""exl2conv.workdir: checkpoints that the job names only once complete, measurement.json written
and read back, and the refusals of damaged files."""

import json

import pytest
import torch

from exl2conv.errors import Exl2Error
from exl2conv.job import FINGERPRINT_KEY, Job, new_job_data
from exl2conv.workdir import MEASUREMENT, PREDICTED_KEY, WorkFolder, predicted_of


@pytest.fixture
def folder(tmp_path):
    job = Job(tmp_path, new_job_data({"in_dir": "/nowhere"}))
    job.save()
    return WorkFolder(job)


def test_checkpoint_round_trip_and_the_previous_file_removed(folder):
    cpu = torch.device("cpu")
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    folder.save_checkpoint("quant", 3, a, q_last_module_idx=3)
    folder.save_checkpoint("quant", 5, b, q_last_module_idx=5)
    assert sorted(p.name for p in folder.path.glob("states_*")) == ["states_quant_0005.safetensors"]
    again = WorkFolder(Job.load(folder.path))
    assert again.job["q_last_module_idx"] == 5
    index, states = again.load_checkpoint("quant", cpu)
    assert index == 5 and torch.equal(states, b)
    with pytest.raises(Exl2Error, match="no measure checkpoint"):
        again.load_checkpoint("measure", cpu)


def test_a_position_only_checkpoint_has_no_states(folder):
    folder.save_checkpoint("measure", 0, None, last_module_idx=0)
    assert folder.load_checkpoint("measure", torch.device("cpu")) == (0, None)


def test_damaged_checkpoints_are_refused(folder):
    cpu = torch.device("cpu")
    folder.save_checkpoint("quant", 2, torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(Exl2Error, match="NaN or Inf"):
        folder.load_checkpoint("quant", cpu)
    (folder.path / "states_quant_0002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exl2Error, match="checkpoint unreadable"):
        folder.load_checkpoint("quant", cpu)


def test_stray_checkpoints_are_removed(folder):
    folder.save_checkpoint("quant", 1, torch.zeros(1, 1, 1))
    (folder.path / "states_quant_0002.safetensors").write_bytes(b"left by a kill")
    folder.remove_stray_checkpoints()
    assert [p.name for p in folder.path.glob("states_*")] == ["states_quant_0001.safetensors"]


def test_measurement_round_trip_keeps_exllamav2_keys_and_predicted_kl(folder):
    meas = {"model.layers.0.self_attn": [{"accuracy": 0.99, "total_bits": 100}]}
    folder.write_measurement(meas, 1, {"model.layers.0.self_attn": [0.25]})
    doc = json.loads((folder.path / MEASUREMENT).read_text())
    assert doc["measurement"] == meas and doc["last_module_idx"] == 1
    assert folder.read_measurement() == (meas, {"model.layers.0.self_attn": [0.25]})


def test_predicted_kl_that_does_not_parse_is_left_out():
    doc = {FINGERPRINT_KEY: {PREDICTED_KEY: {"a": [1, "2"], "b": "x", "c": [None]}}}
    assert predicted_of(doc) == {"a": [1.0, 2.0]}
    assert predicted_of({"measurement": {}}) == {}


def test_a_corrupt_or_missing_measurement_is_refused(folder):
    with pytest.raises(Exl2Error, match="is missing"):
        folder.read_measurement()
    (folder.path / MEASUREMENT).write_text('{"measurement": [1, 2]}')
    with pytest.raises(Exl2Error, match="is corrupt"):
        folder.read_measurement()
