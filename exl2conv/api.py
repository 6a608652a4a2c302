"""The Python API: :func:`convert` (the command line as a function) and :class:`Exl2Quantizer`
(for a model already loaded with transformers).

Both run the same converter as ``exl2conv -i ... -o ...`` and write the same files.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from exl2conv.errors import Exl2Error


def convert(in_dir: str | Path | None, out_dir: str | Path, bits: float = 4.125, head_bits: int = 6,
            compile_full: str | Path | None = None, cal_dataset: str | Path | None = None,
            dataset_rows: int | None = None, measurement_rows: int | None = None,
            length: int | None = None, measurement_length: int | None = None,
            shard_size: float | None = None, rope_scale: float | None = None, rope_alpha: float | None = None,
            output_measurement: str | Path | None = None, measurement: str | Path | None = None,
            checkpoint_interval: float | None = None, status_output: bool | None = None,
            no_resume: bool = False, device: str | None = None, quiet: bool = False, **options: Any):
    """Convert (or resume converting) the model in ``in_dir``; ``out_dir`` is the working folder
    (``-o``). Keyword arguments are the CLI's long option names (``measurement`` is ``-m``);
    None means the CLI's default. ``options`` takes any further job field of
    :data:`exl2conv.job.ARGS`. Returns the :class:`exl2conv.report.Summary`; raises
    :class:`exl2conv.errors.Exl2Error` with a one-line message on bad input."""
    from exl2conv.pipeline import convert as run
    from exl2conv.job import ARG_BY_FIELD
    from exl2conv.report import Reporter

    values = {
        "in_dir": in_dir, "cal_dataset": cal_dataset, "bits": bits, "dataset_rows": dataset_rows,
        "measurement_rows": measurement_rows, "length": length, "measurement_length": measurement_length,
        "head_bits": head_bits, "shard_size": shard_size, "compile_full": compile_full,
        "rope_scale": rope_scale, "rope_alpha": rope_alpha, "output_measurement": output_measurement,
        "reuse_measurement": measurement, "status_output": status_output,
        "checkpoint_interval": checkpoint_interval,
    }
    for key, value in options.items():
        if key not in ARG_BY_FIELD or key in values:
            raise TypeError(f"convert() got an unexpected keyword argument {key!r}")
        values[key] = value
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    rep = Reporter(status_output=bool(status_output), quiet=quiet)
    return run(values, out_dir, no_resume=no_resume, device=device, rep=rep)


def default_head_bits(bits: float) -> int:
    """8-bit head for 6 bpw and more, else 6 (the usual advice; the head is a large, sensitive matrix)."""
    return 8 if bits >= 6 else 6


class Exl2Quantizer:
    """Quantize a transformers model in memory to EXL2.

    >>> q = Exl2Quantizer(bits=4.0)
    >>> q.quantize_model(model, tokenizer)   # doctest: +SKIP
    >>> q.save("SmolLM2-4.0bpw-exl2")          # doctest: +SKIP

    ``dataset`` is a parquet file path, a list of texts (written to a temporary parquet file), or
    None for the built-in calibration set. ``head_bits`` None picks 8 for ``bits >= 6``, else 6.
    Other keyword arguments are :func:`convert`'s (``length``, ``measurement_length``, ``device``...).
    """

    def __init__(self, bits: float = 4.125, head_bits: int | None = None, dataset: Any = None, **options: Any):
        self.bits = float(bits)
        self.head_bits = default_head_bits(self.bits) if head_bits is None else int(head_bits)
        self.dataset = dataset
        self.options = options
        self.summary = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._result: Path | None = None

    def quantize_model(self, model, tokenizer):
        """Save ``model`` (as FP16 safetensors) and ``tokenizer`` to a temporary folder, convert it
        and keep the result for :meth:`save`. Returns the Summary. The model is not modified."""
        self.cleanup()
        self._tmp = tempfile.TemporaryDirectory(prefix="exl2conv-")
        root = Path(self._tmp.name)
        src = root / "fp16"
        _save_fp16(model, tokenizer, src)
        cal = self.dataset
        if cal is not None and not isinstance(cal, (str, Path)):
            cal = _texts_to_parquet(list(cal), root / "calibration.parquet")
        self._result = root / "exl2"
        self.summary = convert(src, root / "work", bits=self.bits, head_bits=self.head_bits,
                               compile_full=self._result, cal_dataset=cal, **self.options)
        return self.summary

    def save(self, save_directory: str | Path) -> Path:
        """Copy the converted model folder (the files ``-cf`` writes) to ``save_directory``."""
        if self._result is None or not self._result.is_dir():
            raise Exl2Error("nothing to save yet: call quantize_model(model, tokenizer) first")
        dest = Path(save_directory).expanduser().resolve()
        if dest.exists() and any(dest.iterdir()):
            raise Exl2Error(f"{dest} already exists and is not empty; choose a new folder")
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(self._result.iterdir()):
            shutil.copyfile(f, dest / f.name)
        return dest

    def cleanup(self) -> None:
        """Delete the temporary folder (also done when the quantizer is garbage-collected)."""
        if self._tmp is not None:
            self._tmp.cleanup()
        self._tmp, self._result = None, None


def _save_fp16(model, tokenizer, dest: Path) -> None:
    import torch

    # a float16 copy of the state dict: the caller's model keeps its dtype
    state = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    model.save_pretrained(str(dest), state_dict=state)
    tokenizer.save_pretrained(str(dest))
    if not list(dest.glob("*.safetensors")):
        raise Exl2Error(f"{dest}: transformers wrote no .safetensors file; upgrade transformers (>= 4.35)")


def _texts_to_parquet(texts: list[str], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not texts or not all(isinstance(t, str) for t in texts):
        raise Exl2Error("dataset: give a parquet file path or a non-empty list of strings")
    pq.write_table(pa.table({"text": texts}), str(path))
    return path
