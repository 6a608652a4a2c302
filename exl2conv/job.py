"""The job: frozen inputs, progress through the stages, and the resume rules.

The job lives in ``<work dir>/job.json``, rewritten atomically after every state change. Its field
names are ExLlamaV2's (the ``job`` dict of its conversion/convert_exl2.py, which save_job writes)
so the file reads familiarly; what differs is deliberate: paths are stored resolved, the
measurement lives in ``measurement.json`` beside it (not inline), and a resumed run refuses
arguments that contradict the saved job instead of ignoring them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from exl2conv import __version__, atomic
from exl2conv.errors import Exl2Error
from exl2conv.worklock import LOCK_FILE

JOB_FILE = "job.json"
TOOL = "exl2conv"


class Stage(str, Enum):
    BEGIN = "begin"
    INITIAL_EMBEDDINGS = "initial_embeddings"
    SENSITIVITY = "sensitivity"
    MEASURE = "measure_quant"
    OPTIMIZE = "optimize"
    TOKENS_CAL = "tokens_cal"
    EMBEDDINGS = "embeddings"
    QUANT = "quant"
    COMPILE = "compile"
    FINISHED = "finished"


@dataclass(frozen=True)
class Arg:
    """One job input: its field name, the flag that sets it, its default, and whether a resumed
    run may give a different value (only presentation and checkpoint timing may change)."""

    field: str
    flag: str
    default: Any
    may_change: bool = False
    is_path: bool = False
    open_until: str | None = None  # the last stage (value) at which it may still change

    def changeable(self, stage: "Stage") -> bool:
        return self.may_change or (self.open_until is not None and
                                   STAGE_ORDER.index(stage) <= STAGE_ORDER.index(Stage(self.open_until)))


ARGS: tuple[Arg, ...] = (
    Arg("in_dir", "-i", None, is_path=True),
    Arg("cal_dataset", "-c", None, is_path=True),
    Arg("bits", "-b", 4.125, open_until="optimize"),  # chosen at optimize: a bad -b costs no measurement
    Arg("dataset_rows", "-r", 100),
    Arg("measurement_rows", "-mr", 16),
    Arg("length", "-l", 2048),
    Arg("measurement_length", "-ml", 2048),
    Arg("head_bits", "-hb", 6, open_until="embeddings"),
    Arg("shard_size", "-ss", 8192.0, open_until="compile"),
    Arg("compile_full", "-cf", None, is_path=True),
    Arg("rope_scale", "-rs", None),
    Arg("rope_alpha", "-ra", None),
    Arg("output_measurement", "-om", None, is_path=True),
    Arg("reuse_measurement", "-m", None, is_path=True),
    Arg("status_output", "-so", False, may_change=True),
    Arg("checkpoint_interval", "-cpi", 180.0, may_change=True),
    Arg("force_measurement", "--force-measurement", False, may_change=True),
)
ARG_BY_FIELD = {a.field: a for a in ARGS}
STAGE_ORDER = list(Stage)
UNLIMITED_SHARD_MB = 1024 ** 3  # what ExLlamaV2 stores for -ss 0


def normalize(field: str, value: Any) -> Any:
    """The stored form of an argument value (resolved paths, -ss 0 as unlimited)."""
    if value is None:
        return None
    arg = ARG_BY_FIELD[field]
    if arg.is_path:
        return str(Path(value).expanduser().resolve())
    if field == "shard_size":
        return float(UNLIMITED_SHARD_MB) if float(value) == 0 else float(value)
    if field in ("bits", "rope_scale", "rope_alpha", "checkpoint_interval"):
        return float(value)
    if field in ("dataset_rows", "measurement_rows", "length", "measurement_length", "head_bits"):
        return int(value)
    return value


class Job:
    """The job file's content with atomic saves. ``data`` is a plain JSON-able dict."""

    def __init__(self, out_dir: Path, data: dict):
        self.out_dir = Path(out_dir)
        self.data = data
        self._clock: tuple[str, float] | None = None  # the running stage and when it started

    # -- file -------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.out_dir / JOB_FILE

    def save(self) -> None:
        atomic.write_json(self.path, self.data)

    @classmethod
    def load(cls, out_dir: Path) -> "Job":
        path = Path(out_dir) / JOB_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Exl2Error(f"{path} is unreadable or corrupt ({exc.__class__.__name__}); "
                            "start the job afresh with -nr") from None
        if not isinstance(data, dict) or data.get("tool") != TOOL or "progress" not in data:
            raise Exl2Error(f"{path} was not written by exl2conv; use another working directory "
                            "or start afresh with -nr")
        try:
            Stage(data["progress"])
        except ValueError:
            raise Exl2Error(f"{path} names an unknown stage {data['progress']!r}; start afresh with -nr") from None
        return cls(out_dir, data)

    # -- state ------------------------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return Stage(self.data["progress"])

    def start_clock(self, stage: Stage) -> None:
        """Time ``stage`` until the job advances past it."""
        self._clock = (stage.value, time.monotonic())

    def advance(self, stage: Stage, **fields: Any) -> None:
        """Move to ``stage`` with ``fields``, and the finished stage's time, in one atomic save (a
        second save for the time would leave a window in which a kill loses it)."""
        self.data.update(fields)
        if self._clock is not None:
            name, t0 = self._clock
            times = dict(self.data.get("times") or {})
            times[name] = times.get(name, 0.0) + time.monotonic() - t0
            self.data["times"] = times
            self._clock = None
        self.data["progress"] = stage.value
        self.save()

    def __getitem__(self, key: str) -> Any:
        return self.data.get(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value


def new_job_data(values: dict[str, Any]) -> dict:
    data: dict[str, Any] = {"tool": TOOL, "version": __version__}
    for arg in ARGS:
        v = values.get(arg.field)
        data[arg.field] = normalize(arg.field, arg.default if v is None else v)
    data["progress"] = Stage.BEGIN.value
    return data


def resume_conflicts(saved: dict, given: dict[str, Any]) -> list[str]:
    """Arguments given on the command line that contradict the saved job, as
    ``flag: saved X, given Y``. -b, -hb and -ss may still change until the stage that uses them."""
    lines = []
    stage = Stage(saved.get("progress", Stage.BEGIN.value))
    for arg in ARGS:
        if arg.changeable(stage) or given.get(arg.field) is None:
            continue
        new = normalize(arg.field, given[arg.field])
        old = saved.get(arg.field)
        if new != old:
            lines.append(f"{arg.flag}: saved {old!r}, given {new!r}")
    return lines


def entries_besides_lock(out_dir: Path) -> list[Path]:
    """The working folder's entries other than the lock file (which a process makes first) and
    the temporary files of our interrupted writes (a kill during the job's first save leaves
    only those)."""
    return [p for p in Path(out_dir).iterdir() if p.name != LOCK_FILE and not atomic.is_temp_name(p.name)]


def is_ours(out_dir: Path) -> bool:
    """True when ``out_dir`` holds an exl2conv job file (readable or not)."""
    path = Path(out_dir) / JOB_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("tool") == TOOL
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        # a corrupt job file in a folder we created is still ours to clear with -nr
        return path.stat().st_size == 0 or b'"tool": "exl2conv"' in path.read_bytes()[:4096]


def clear_work_dir(out_dir: Path) -> None:
    """-nr: empty the working directory, but only when it is empty or holds our job."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    entries = entries_besides_lock(out_dir)  # the lock is held by this very process
    if not entries:
        return
    if not is_ours(out_dir):
        raise Exl2Error(f"-nr would delete everything in {out_dir}, which holds files but no exl2conv "
                        f"job ({JOB_FILE}); point -o at an empty or new folder")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            os.unlink(entry)


# -- fingerprints ---------------------------------------------------------------------------------

# config.json fields that decide tensor shapes and which tensors exist: a measurement or a job is
# tied to these, not to the weights' values (a fine-tune of the same base shares them).
SHAPE_CONFIG_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                     "tie_word_embeddings", "attention_bias", "mlp_bias")
# job.json: the calibration rows each pass really tokenized ({"measure": n, "quant": n}). Kept
# apart from -mr / -r, which hold what the user asked for: the built-in set fixes its own row
# counts, and a resume compares the command with what the command said, not with what the set
# decided (docs/cli.md, -r and -mr).
ROWS_USED = "calibration_rows"
CALIBRATION_FIELDS = ("cal_dataset", "measurement_rows", "measurement_length", "rope_scale", "rope_alpha")
FINGERPRINT_KEY = TOOL  # the extra top-level key of measurement.json, which ExLlamaV2 ignores


def model_fingerprint(config: dict, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """sha256 (hex) of a model's weight metadata: the shape-deciding fields of its config.json
    and every tensor's name, dtype and shape (``tensors``: name -> (dtype, shape)). Reads no
    tensor data, so it costs milliseconds on any model."""
    doc = {
        "config": {k: config.get(k) for k in SHAPE_CONFIG_KEYS if k in config},
        "tensors": sorted([name, str(dtype), [int(d) for d in shape]] for name, (dtype, shape) in tensors.items()),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def calibration_settings(data: dict) -> dict:
    """The settings a measurement depends on besides the model, from job data: dataset (file
    name and size, or "(default)"), rows, length and RoPE overrides."""
    out: dict[str, Any] = {}
    ds = data.get("cal_dataset")
    if ds:
        p = Path(ds)
        out["dataset"] = p.name
        out["dataset_bytes"] = p.stat().st_size if p.is_file() else None
    else:
        out["dataset"] = "(default)"
    for f in CALIBRATION_FIELDS[1:]:
        out[f] = data.get(f)
    used = (data.get(ROWS_USED) or {}).get("measure")
    if not ds and used is not None:
        out["measurement_rows"] = used  # the built-in set's own count; -mr does not apply to it
    return out


def measurement_fingerprint(doc: dict) -> str | None:
    """The model fingerprint a measurement.json carries, or None (ExLlamaV2's own files)."""
    block = doc.get(FINGERPRINT_KEY)
    fp = block.get("model_fingerprint") if isinstance(block, dict) else None
    return fp if isinstance(fp, str) else None
