"""The working folder (-o): the files a job keeps there, its checkpoints, measurement.json, and
opening the folder's job (a new one, or the saved one under the resume rules).

Every write goes through :mod:`exl2conv.atomic`, and the job names a file only once it is
complete, so a job interrupted at any instant finds a consistent folder when it resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from exl2conv import atomic, faults, settings
from exl2conv.errors import Exl2Error
from exl2conv.job import (ARGS, FINGERPRINT_KEY, JOB_FILE, Job, Stage, calibration_settings, clear_work_dir,
                          entries_besides_lock, is_ours, measurement_fingerprint, new_job_data, normalize,
                          resume_conflicts)
from exl2conv.model.weights import all_finite
from exl2conv.report import Reporter

CAL_FILES = {"measure": "cal_measure.safetensors", "quant": "cal_quant.safetensors"}
MEASUREMENT = "measurement.json"
SENSITIVITY = "sensitivity.safetensors"
PREDICTED_KEY = "predicted_kl"  # under FINGERPRINT_KEY: each entry's predicted KL, by module key
NOISE_KEY = "noise_statistics"  # in a CAL_FILES file: exl2conv.noise_rows.statistics of its rows
OUT_TENSOR = "out_tensor"  # the quantization pass's tensors, one file per linear or tweaked norm


class WorkFolder:
    """The files of ``job``'s working folder."""

    def __init__(self, job: Job):
        self.job = job

    @property
    def path(self) -> Path:
        return self.job.out_dir

    # -- calibration token ids and the sensitivity ----------------------------------------------

    def ids_file(self, which: str) -> Path:
        """The token ids of a calibration set (``which``: "measure" or "quant")."""
        return self.path / CAL_FILES[which]

    def save_ids(self, which: str, ids: torch.Tensor, noise: torch.Tensor | None = None) -> None:
        """The token ids, and with noise rows among them their statistics (exl2conv.noise_rows),
        in one file: a resume embeds the rows exactly as the first run did."""
        extra = {} if noise is None else {NOISE_KEY: noise}
        atomic.save_tensors(self.ids_file(which), {"input_ids": ids, **extra})

    def load_ids(self, which: str) -> torch.Tensor:
        with safe_open(str(self.ids_file(which)), framework="pt") as f:
            return f.get_tensor("input_ids")

    def load_noise_statistics(self, which: str) -> torch.Tensor | None:
        """The noise rows' [mean, std] saved with the ids, or None where the set has none."""
        with safe_open(str(self.ids_file(which)), framework="pt") as f:
            return f.get_tensor(NOISE_KEY) if NOISE_KEY in f.keys() else None

    def save_sensitivity(self, fisher: torch.Tensor) -> None:
        atomic.save_tensors(self.path / SENSITIVITY, {"fisher": fisher})

    def load_sensitivity(self) -> torch.Tensor | None:
        """``[2 * layers, H]`` from the sensitivity stage, or None when the job has none."""
        path = self.path / SENSITIVITY
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor("fisher")
        except Exception as exc:  # noqa: BLE001 - any unreadable file means the same to the user
            raise Exl2Error(f"{path}: unreadable ({exc.__class__.__name__}); start afresh with -nr") from None

    def out_tensor_file(self, prefix: str) -> Path:
        """The quantization pass's file of the tensors named ``<prefix>.*`` (a linear's packed
        tensors, a tweaked norm's weight), which the compile copies into the output."""
        return self.path / OUT_TENSOR / f"{prefix}.safetensors"

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, pass_: str, index: int, states: torch.Tensor | None, **fields) -> None:
        """States after module ``index`` are written to a new file first; only then does the job
        name it (one atomic save, with ``fields``), and only then is the previous file removed: at
        every instant the job names a complete checkpoint. ``states`` None: the job records the
        position only (the embeddings, cheaper to recompute than to store)."""
        job = self.job
        old = (job["checkpoint"] or {}).get("file")
        fname = None
        if states is not None:
            fname = f"states_{pass_}_{index:04d}.safetensors"
            atomic.save_tensor_streamed(self.path / fname, "hidden_states", states)
        faults.point("checkpoint")
        job.data.update(fields)
        job["checkpoint"] = {"pass": pass_, "module": index, "file": fname}
        job.save()
        if old and old != fname:
            atomic.remove(self.path / old)

    def load_checkpoint(self, pass_: str, device: torch.device, home: torch.device | None = None,
                        rows: range | None = None) -> tuple[int, torch.Tensor | None]:
        """The module index of the job's checkpoint of ``pass_`` and its calibration states on
        ``home`` (default ``device``; pinned when the CPU stands in for a GPU), or None for
        states the checkpoint does not store (module 0: the caller embeds the token ids).
        ``rows``: only these rows are read (a rank's share of a job on several devices)."""
        cp = self.job["checkpoint"]
        if not cp or cp.get("pass") != pass_:
            raise Exl2Error(f"{self.job.path}: no {pass_} checkpoint to resume from; start afresh with -nr")
        if not cp.get("file"):
            return int(cp["module"]), None
        path = self.path / cp["file"]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                states = (f.get_tensor("hidden_states") if rows is None else
                          f.get_slice("hidden_states")[rows.start:rows.stop])
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means the same to the user
            raise Exl2Error(f"{path}: checkpoint unreadable ({exc.__class__.__name__}); start afresh "
                            "with -nr") from None
        if not all_finite(states):
            raise Exl2Error(f"{path}: the checkpointed calibration states hold NaN or Inf values (a damaged "
                            "file); start afresh with -nr")
        if home is None or home == device:
            states = states.to(device)
        elif device.type == "cuda":
            states = states.pin_memory()
        return int(cp["module"]), states

    def remove_stray_checkpoints(self) -> None:
        """States files the job does not name are leftovers of an interrupted checkpoint."""
        keep = (self.job["checkpoint"] or {}).get("file")
        for p in self.path.glob("states_*.safetensors"):
            if p.name != keep:
                atomic.remove(p)

    # -- measurement.json -----------------------------------------------------------------------

    def write_measurement(self, meas: dict, last_module_idx: int | None, predicted: dict | None = None) -> None:
        """measurement.json: ExLlamaV2's two keys, plus, under a key it ignores, our fingerprint
        (so that -m can tell a measurement of another model) and each entry's predicted KL (the
        solver's objective, see :mod:`exl2conv.sensitivity`)."""
        ours = {"model_fingerprint": (self.job["fingerprint"] or {}).get("model"),
                "calibration": calibration_settings(self.job.data)}
        if predicted:
            ours[PREDICTED_KEY] = predicted
        doc = {"measurement": meas, "last_module_idx": last_module_idx, FINGERPRINT_KEY: ours}
        atomic.write_json(self.path / MEASUREMENT, doc)

    def read_measurement(self) -> tuple[dict, dict[str, list[float]]]:
        """The ``measurement`` object of the folder's measurement.json, and its entries'
        predicted KL (:func:`predicted_of`), from one read of the file."""
        path = self.path / MEASUREMENT
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            meas = doc["measurement"]
            if not isinstance(meas, dict):
                raise TypeError
        except FileNotFoundError:
            raise Exl2Error(f"{path} is missing; the job cannot go on without it: start afresh with -nr") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise Exl2Error(f"{path} is corrupt (not a measurement.json); start afresh with -nr "
                            "(or give a good measurement with -m)") from None
        return meas, predicted_of(doc)


def predicted_of(doc: dict) -> dict[str, list[float]]:
    """The predicted KL of each measured entry in a measurement.json ``doc``, by module key; empty
    for a measurement without them (ExLlamaV2's). Entries that do not parse are left out, and the
    solver then falls back to the error objective."""
    block = doc.get(FINGERPRINT_KEY)
    block = block.get(PREDICTED_KEY) if isinstance(block, dict) else None
    out = {}
    for key, values in (block.items() if isinstance(block, dict) else ()):
        if not isinstance(values, list):
            continue
        try:
            out[key] = [float(x) for x in values]
        except (TypeError, ValueError):
            pass
    return out


def load_measurement_file(path: Path) -> dict:
    """A measurement.json given with -m (ours or ExLlamaV2's): its ``measurement`` and
    ``last_module_idx``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Exl2Error(f"-m {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Exl2Error(f"-m {path}: not a readable measurement.json ({exc.__class__.__name__}); "
                        "measure again with -om") from None
    if not isinstance(data, dict) or not isinstance(data.get("measurement"), dict):
        raise Exl2Error(f"-m {path}: not a measurement file (no 'measurement' object)")
    return data


def check_measurement_fingerprint(data: dict, fingerprint: str | None, values: dict[str, Any]) -> None:
    """-m with a measurement of another model is refused, unless --force-measurement. ExLlamaV2's
    own files carry no fingerprint: they are checked by their total_bits only (stage optimize)."""
    theirs = measurement_fingerprint(data)
    if theirs is None or fingerprint is None or theirs == fingerprint or values.get("force_measurement"):
        return
    raise Exl2Error(f"-m {values['reuse_measurement']}: this measurement was made for another model (its "
                    f"fingerprint {theirs[:12]} is not {fingerprint[:12]}, the fingerprint of the tensor names, "
                    f"shapes and config of {values['in_dir']}); measure this model (leave out -m), or add "
                    "--force-measurement if you know it fits")


# -- opening the folder's job ------------------------------------------------------------------------


def check_work_dir(values: dict[str, Any], out_dir: Path, no_resume: bool) -> None:
    """The refusals due before anything in the working folder is created, locked or cleared."""
    if out_dir.exists() and entries_besides_lock(out_dir) and not is_ours(out_dir):
        if no_resume:
            clear_work_dir(out_dir)  # refuses, naming the folder
        if (out_dir / JOB_FILE).exists():
            Job.load(out_dir)  # refuses, saying what is wrong with the job file
        raise Exl2Error(f"-o {out_dir} already holds files that are not an exl2conv job; choose an empty "
                        "or new working folder (exl2conv never writes over files it did not make)")
    if (no_resume or not (out_dir / JOB_FILE).exists()) and not values.get("in_dir"):
        raise Exl2Error(f"no job to resume in {out_dir}; give the model folder with -i to start one")


def open_job(values: dict[str, Any], out_dir: Path, no_resume: bool, rep: Reporter, recorded: dict[str, Any],
             fingerprint: str | None = None, reuse: dict | None = None) -> Job:
    """Create a new job or resume the saved one, enforcing the resume rules; the caller holds the
    folder's lock. ``recorded``: the output settings in force (:meth:`Settings.recorded`), which a
    resume must match; ``fingerprint``: the model's (:func:`exl2conv.validate.model_fingerprint_of`),
    needed to start a job; ``reuse``: the -m measurement file's content."""
    if no_resume:
        clear_work_dir(out_dir)
    if (out_dir / JOB_FILE).exists():
        return _resume(Job.load(out_dir), values, rep, recorded)
    job = Job(out_dir, new_job_data(values))
    job["settings"] = recorded
    job["fingerprint"] = {"model": fingerprint, "calibration": calibration_settings(job.data)}
    if reuse is not None:
        doc = {"measurement": reuse["measurement"], "last_module_idx": reuse.get("last_module_idx")}
        if isinstance(reuse.get(FINGERPRINT_KEY), dict):
            doc[FINGERPRINT_KEY] = reuse[FINGERPRINT_KEY]
        atomic.write_json(out_dir / MEASUREMENT, doc)
        job["last_module_idx"] = reuse.get("last_module_idx")
    job.save()
    rep.info(f"Starting new job in {out_dir}")
    return job


def _resume(job: Job, values: dict[str, Any], rep: Reporter, recorded: dict[str, Any]) -> Job:
    """The saved ``job``, when the command and the settings in force match it; the arguments a
    resume may change (:meth:`Arg.changeable`) take the command's values."""
    again = f"or add -nr to start a new job (this deletes the job's files in {job.out_dir})"
    conflicts = resume_conflicts(job.data, values)
    if conflicts:
        raise Exl2Error(f"the arguments differ from the saved job in {job.out_dir} ({'; '.join(conflicts)}); "
                        f"run the same command as before to resume, {again}")
    # a finished job only prints its summary: nothing it computes could mix two settings
    changed = settings.differences(job["settings"], recorded) if job.stage != Stage.FINISHED else []
    if changed:
        raise Exl2Error(f"the settings differ from those the job in {job.out_dir} started with "
                        f"({'; '.join(changed)}); resume with the same settings, version and device, {again}")
    for arg in ARGS:
        if arg.changeable(job.stage) and values.get(arg.field) is not None:
            job[arg.field] = normalize(arg.field, values[arg.field])
    rep.info(f"Resuming job in {job.out_dir} (stage: {job.stage.value})")
    return job
