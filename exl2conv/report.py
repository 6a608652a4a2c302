"""Console output: progress lines, warnings, -so status lines and progress bars with an ETA.

Lines start as ExLlamaV2's do (" -- " progress, " !! " warning) so logs read the same. No maths
module prints: they return records and the stages report them here.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tqdm import tqdm

from exl2conv import calibration
from exl2conv.model.arch import spec_of
from exl2conv.model.moe_config import caveats


class Reporter:
    def __init__(self, status_output: bool = False, stream=None, quiet: bool = False):
        self.status_output = status_output
        self.stream = stream or sys.stdout
        self.quiet = quiet

    def info(self, msg: str) -> None:
        if not self.quiet:
            _write(f" -- {msg}", self.stream)

    def warn(self, msg: str) -> None:
        _write(f" !! Warning: {msg}", sys.stderr)

    def line(self, msg: str = "") -> None:
        if not self.quiet:
            _write(msg, self.stream)

    def status(self, stage: str, done: int, total: int) -> None:
        """-so: machine-readable progress, ExLlamaV2's format."""
        if self.status_output:
            obj = {"stage": stage, "completion": round(done / max(total, 1), 4)}
            print("[STATUS]", json.dumps(obj), "[/STATUS]", file=self.stream, flush=True)

    @contextmanager
    def progress(self, desc: str, total: int, stage: str | None = None, initial: int = 0) -> Iterator["_Progress"]:
        bar = tqdm(total=total, initial=initial, desc=f" -- {desc}", unit="mod", file=sys.stderr,
                   disable=self.quiet, dynamic_ncols=True, smoothing=0.1,
                   bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        p = _Progress(self, bar, stage, total)
        try:
            yield p
        finally:
            bar.close()


class _Progress:
    def __init__(self, rep: Reporter, bar, stage: str | None, total: int):
        self.rep, self.bar, self.stage, self.total = rep, bar, stage, total

    def update(self, n: int = 1, **postfix) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        if self.stage:
            self.rep.status(self.stage, self.bar.n, self.total)


def _write(msg: str, stream) -> None:
    """A whole line, above any progress bar on the terminal (a plain print would land inside it,
    e.g. an MoE layer's coverage line during the measurement)."""
    tqdm.write(msg, file=stream)
    stream.flush()


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def peak_rss_gib() -> float:
    """This process's peak resident memory: the kernel's high-water mark of its own address
    space (VmHWM) where there is one; ru_maxrss elsewhere, which on Linux also counts what a
    parent shared with it between fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- the end of a run ------------------------------------------------------------------------------


@dataclass
class Summary:
    out_dir: Path
    output_files: list[str]
    decoder_bpw: float | None
    head_bpw: float | None
    expected_error: float | None
    calibration_ppl: float | None
    times: dict[str, float]
    measurement_only: bool = False
    calibration_ppl_on: tuple[int, int] | None = None  # (rows, tokens per row) of the quantization set
    # norm tweaking: mean relative drop of the modules' losses, and the head's KL before/after
    tweak_gain: float | None = None
    head_kl: tuple[float, float] | None = None


def summarize(job) -> Summary:
    """What a run achieved, from its job (:class:`exl2conv.job.Job`): bits per weight, expected error,
    calibration perplexity, norm tweaking's gain, times and output files."""
    dec_bits = dec_numel = head_bits = head_numel = 0
    ppl = head_kl = ppl_on = None
    gains = []
    for rec in job["quant_log"] or []:
        if "tweak" in rec:
            before, after = rec["tweak"]
            if "ppl" in rec:
                head_kl = (before, after)
            elif before > 0:
                gains.append(1 - after / before)
        for _name, _desc, bits, numel in rec.get("linears", []):
            if "ppl" in rec:  # the head's record (its name is the checkpoint's: InternLM2's is "output")
                head_bits, head_numel = head_bits + bits, head_numel + numel
            else:
                dec_bits, dec_numel = dec_bits + bits, dec_numel + numel
        if "ppl" in rec:
            ppl = rec["ppl"]
            ppl_on = (rec["ppl_rows"], rec["ppl_length"]) if "ppl_rows" in rec else None
    solver_info = job["solver"] or {}
    return Summary(
        out_dir=job.out_dir,
        output_files=list(job["output_files"] or []),
        decoder_bpw=dec_bits / dec_numel if dec_numel else None,
        head_bpw=head_bits / head_numel if head_numel else None,
        expected_error=solver_info.get("loss"),
        calibration_ppl=ppl,
        calibration_ppl_on=ppl_on,
        times=dict(job["times"] or {}),
        measurement_only=bool(job["output_measurement"]),
        tweak_gain=sum(gains) / len(gains) if gains else None,
        head_kl=head_kl,
    )


def format_summary(s: Summary) -> str:
    lines = ["", " == Finished" + (" (measurement only)" if s.measurement_only else "")]
    if s.decoder_bpw is not None:
        lines.append(f"    decoder: {s.decoder_bpw:.4f} bpw    head: {s.head_bpw:.4f} bpw")
    if s.expected_error is not None:
        lines.append(f"    expected error (sum over modules): {s.expected_error:.6f}")
    if s.calibration_ppl is not None:
        on = (f", first {s.calibration_ppl_on[0]} rows x {s.calibration_ppl_on[1]} tokens of the quantization set"
              if s.calibration_ppl_on else "")
        lines.append(f"    calibration perplexity (quantized{on}): {s.calibration_ppl:.4f}")
    if s.tweak_gain is not None:
        text = f"    norm tweaking: module output error on its rows -{100 * s.tweak_gain:.1f} % (mean)"
        if s.head_kl is not None:
            text += f"; KL at the head {s.head_kl[0]:.4f} -> {s.head_kl[1]:.4f} nats/token"
        lines.append(text)
    if s.times:
        lines.append("    time: " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in s.times.items())
                     + f"; total {fmt_seconds(sum(s.times.values()))}")
    lines.append("    peak memory: " + peak_memory())
    for f in s.output_files:
        lines.append(f"    output: {f}")
    return "\n".join(lines)


def peak_memory() -> str:
    rss = peak_rss_gib()
    text = f"RSS {rss:.2f} GiB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


def print_plan(job, device, rep: Reporter, cfg=None) -> None:
    """What a job will do, printed as it starts or resumes: its folders, calibration (with the
    noise rows the built-in set gets for model ``cfg``, exl2conv.noise_rows), targets and device;
    then, as warnings, where ExLlamaV2 will run ``cfg`` otherwise (moe_config.caveats)."""
    noise = tuple(reversed(spec_of(cfg).calib_noise)) if cfg is not None else (0, 0)
    rep.info(f"Input: {job['in_dir']}")
    rep.info(f"Output: {job['compile_full'] or job.out_dir}")
    if job["cal_dataset"]:
        rep.info(f"Calibration dataset: {job['cal_dataset']}; rows {job['dataset_rows']} / {job['measurement_rows']}, "
                 f"length {job['length']} / {job['measurement_length']}")
    else:
        extra = [f" + {n} noise" if n else "" for n in noise]
        rep.info(f"Calibration dataset: built-in; rows {calibration.builtin_row_count('quant')}{extra[0]} / "
                 f"{calibration.builtin_row_count('measure')}{extra[1]} (the set's own: -r and -mr apply to a "
                 "parquet file), "
                 f"length {job['length']} / {job['measurement_length']}")
    if job["output_measurement"]:
        rep.info(f"Measurement will be saved to {job['output_measurement']}")
    else:
        rep.info(f"Target bits per weight: {job['bits']} (decoder), {job['head_bits']} (head)")
        rep.info(f"Max shard size: {job['shard_size']:.0f} MB")
    if job["rope_scale"]:
        rep.info(f"RoPE scale: {job['rope_scale']:.2f}")
    if job["rope_alpha"]:
        rep.info(f"RoPE alpha: {job['rope_alpha']:.2f}")
    rep.info(f"Device: {device}")
    for line in caveats(cfg) if cfg is not None else ():
        rep.warn(line)
