"""The GPU path against the CPU path, like for like, on one GPU machine.

    python benchmarks/bench_paths.py --model SMOLLM2_FP16 --work /tmp/paths
    python benchmarks/bench_paths.py --model SMOLLM2_FP16 --work /tmp/paths --no-tf32-too --length 128

Converts the model with the same command three ways (``-b B -ml L -l L``): on the GPU, on the GPU
with ``EXL2CONV_NO_TF32=1`` (``--no-tf32-too``), and with ``--device cpu``. Every run fits norm
tweaking on the same number of tokens (``EXL2CONV_TWEAK_TOKENS``, by default 512, the CPU's own
default), which otherwise differs by design between the two devices. Then it compares each GPU
measurement with the CPU's (benchmarks/compare_measurements.py) and evaluates every output on
the GPU against the FP16 model (``exl2conv eval``, the built-in text), so that the KL figures
differ only by the conversion.

A CPU run of SmolLM2 at ``--length 256`` takes about 13 minutes on 2 cores; use the device's
cores, or ``--length 128``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_measurements import compare  # noqa: E402


def convert(name: str, model: Path, work: Path, bits: float, length: int, env_extra: dict, device: str | None
            ) -> tuple[Path, Path, float]:
    w, out = work / f"{name}-work", work / f"{name}-out"
    args = ["-i", str(model), "-o", str(w), "-cf", str(out), "-b", str(bits), "-ml", str(length), "-l", str(length),
            "-nr"]
    if device:
        args += ["--device", device]
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    t0 = time.monotonic()
    log = work / f"{name}.log"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "exl2conv", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        print(log.read_text(errors="replace")[-3000:])
        raise SystemExit(f"the {name} conversion failed (rc {rc}); log: {log}")
    return w / "measurement.json", out, time.monotonic() - t0


def evaluate(out: Path, model: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "exl2conv", "eval", str(out), "--fp16", str(model), "--json"],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"exl2conv eval {out} failed: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an FP16 model folder (SmolLM2: exl2conv.smollm2.smollm2_fp16)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("-b", "--bits", type=float, default=4.0)
    ap.add_argument("--length", type=int, default=256, help="-ml and -l of every run (default 256)")
    ap.add_argument("--tweak-tokens", type=int, default=512, help="EXL2CONV_TWEAK_TOKENS of every run (default 512)")
    ap.add_argument("--no-tf32-too", action="store_true", help="also convert on the GPU with EXL2CONV_NO_TF32=1")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run without a CUDA device too (every run is then a CPU run: to check the script itself)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench_paths.py needs a CUDA device (it compares the GPU path with the CPU path)")
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    tweak = {"EXL2CONV_TWEAK_TOKENS": str(args.tweak_tokens)}
    runs = [("gpu", dict(tweak), None)]
    if args.no_tf32_too:
        runs.append(("gpu-no-tf32", {**tweak, "EXL2CONV_NO_TF32": "1"}, None))
    runs.append(("cpu", dict(tweak), "cpu"))
    done = {}
    for name, env, device in runs:
        meas, out, wall = convert(name, args.model, args.work, args.bits, args.length, env, device)
        done[name] = (meas, out, wall)
        print(f"{name}: converted in {wall:.1f} s", flush=True)

    rows = []
    for name, (meas, out, wall) in done.items():
        scores = evaluate(out, args.model)
        rows.append((name, wall, scores))
        if name != "cpu":
            print(f"\n{name} against cpu, measurements:")
            compare(meas, done["cpu"][0], args.model, args.bits)
    where = "on the GPU" if torch.cuda.is_available() else "on the CPU (no CUDA device: every run was a CPU run)"
    print(f"\n-b {args.bits}, -ml/-l {args.length}, EXL2CONV_TWEAK_TOKENS={args.tweak_tokens}; "
          f"every output evaluated {where}")
    print(f"{'run':14s}{'wall s':>9s}{'KL':>10s}{'ppl':>9s}{'top-1':>8s}{'decoder bpw':>13s}")
    for name, wall, s in rows:
        print(f"{name:14s}{wall:9.1f}{s['kl']:10.5f}{s['ppl']:9.3f}{s['top1']:8.4f}{s['decoder_bpw']:13.5f}")
    cpu_kl = rows[-1][2]["kl"]
    for name, _, s in rows[:-1]:
        print(f"KL {name} / cpu: {s['kl'] / cpu_kl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
