"""Quality at equal bits: exl2conv (and, when importable, ExLlamaV2 0.3.2) at several -b, each model
scored by `exl2conv eval` against the FP16 model.

    python benchmarks/bench_quality.py --model SMOLLM2_DIR                       # 2.5 3.0 4.0 5.0 6.0
    python benchmarks/bench_quality.py --model DIR --bits 4.0 6.0 --variant EXL2CONV_NO_TWEAK=1
    python benchmarks/bench_quality.py --model DIR --exllamav2-measurement M.json  # ExLlamaV2 beside it

exl2conv runs one full job at the first -b (measurement included), then a quantization job per
other -b on that measurement (`-m`, `-hb 6`): the way docs/quality.md was measured. Each
``--variant KEY=VALUE`` adds a column: the same quantization jobs with that environment variable
set, on the same measurement. ExLlamaV2 quantizes each -b from ``--exllamav2-measurement`` (its own
measurement.json of the same weights, e.g. the fixture's), or, without it, runs its own full job
at the first -b and reuses that measurement.

Prints a table: mean KL from FP16 (nats/token), the ratio to ExLlamaV2's, top-1 agreement,
perplexity and decoder bpw; ``--json FILE`` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def call(args: list[str], log: Path, env: dict[str, str] | None = None) -> str:
    """Run ``python args...`` from the repository, output to ``log``; stop with the log's tail on
    failure. Returns the output."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    full_env.update(env or {})
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=full_env)
    text = log.read_text(errors="replace")
    if rc != 0:
        print(text[-3000:])
        raise SystemExit(f"{' '.join(args[:3])} ... failed (rc {rc}); log: {log}")
    return text


def evaluate(out: Path, model: Path, work: Path, rows: int, ctx: int) -> dict:
    text = call(["-m", "exl2conv", "eval", str(out), "--fp16", str(model), "--rows", str(rows), "--ctx", str(ctx),
                 "--json"], work / f"eval_{out.parent.name}_{out.name}.log")
    return json.loads(text.strip().splitlines()[-1])


def convert(module: str, model: Path, work: Path, bits: str, measurement: Path | None, extra: list[str],
            env: dict[str, str] | None = None) -> Path:
    """One job into ``work/b<bits>``; a full job (writing work/measurement.json) when
    ``measurement`` is None. Returns the compiled folder."""
    job, out = work / f"b{bits}" / "w", work / f"b{bits}" / "out"
    shutil.rmtree(job.parent, ignore_errors=True)
    job.parent.mkdir(parents=True)
    args = ["-m", module, "-i", str(model), "-o", str(job), "-cf", str(out), "-b", bits, "-hb", "6", *extra]
    if measurement is not None:
        args += ["-m", str(measurement)]
    call(args, work / f"convert_b{bits}.log", env)
    if measurement is None:
        shutil.copy(job / "measurement.json", work / "measurement.json")
    return out


def column(module: str, model: Path, work: Path, bits: list[str], measurement: Path | None, extra: list[str],
           rows: int, ctx: int, env: dict[str, str] | None = None) -> dict[str, dict]:
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    for b in bits:
        folder = convert(module, model, work, b, measurement, extra, env)
        if measurement is None:  # the first job measured: the others reuse it
            measurement = work / "measurement.json"
        out[b] = evaluate(folder, model, work, rows, ctx)
        print(f"  {work.name} -b {b}: KL {out[b]['kl']:.4f}", flush=True)
    return out


def table(results: dict[str, dict[str, dict]], bits: list[str], base: str | None) -> str:
    names = list(results)
    lines = ["| -b | " + " | ".join(f"{n} KL" for n in names)
             + ("".join(f" | {n} / {base}" for n in names if n != base) if base else "")
             + " | " + " | ".join(f"{n} top-1 / ppl / bpw" for n in names) + " |"]
    lines.append("|" + "---|" * (1 + len(names) + (len(names) - 1 if base else 0) + len(names)))
    for b in bits:
        row = [b] + [f"{results[n][b]['kl']:.4g}" for n in names]
        if base:
            row += [f"{results[n][b]['kl'] / results[base][b]['kl']:.3f}" for n in names if n != base]
        row += [f"{100 * results[n][b]['top1']:.1f} % / {results[n][b]['ppl']:.2f} / {results[n][b]['decoder_bpw']:.4f}"
                for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the FP16 model folder (e.g. SmolLM2-135M)")
    ap.add_argument("--bits", nargs="+", default=["4.0", "2.5", "3.0", "5.0", "6.0"],
                    help="bitrates; the first one's job also measures (default 4.0 2.5 3.0 5.0 6.0)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                    help="one more exl2conv column with this environment variable set (repeatable)")
    ap.add_argument("--exllamav2-measurement", type=Path, help="ExLlamaV2's measurement.json of the same weights")
    ap.add_argument("--no-exllamav2", action="store_true", help="exl2conv only")
    ap.add_argument("--rows", type=int, default=20, help="evaluation windows (default 20)")
    ap.add_argument("--ctx", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "exl2conv-quality")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("extra", nargs="*", help="more converter flags for every job (after --), e.g. -l 256 -ml 256")
    args = ap.parse_args()
    bits = args.bits

    results: dict[str, dict[str, dict]] = {}
    base = None
    have = False
    if not args.no_exllamav2:
        try:
            import exllamav2  # noqa: F401
            have = True
        except ImportError:
            print("ExLlamaV2 is not importable: exl2conv only", flush=True)
    if have:
        base = "ExLlamaV2"
        results[base] = column("exllamav2.conversion.convert_exl2", args.model, args.work / "exllamav2", bits,
                               args.exllamav2_measurement, args.extra, args.rows, args.ctx)
    results["exl2conv"] = column("exl2conv", args.model, args.work / "exl2conv", bits, None, args.extra,
                                 args.rows, args.ctx)
    measurement = args.work / "exl2conv" / "measurement.json"
    for v in args.variant:
        key, _, value = v.partition("=")
        name = f"exl2conv {v}"
        results[name] = column("exl2conv", args.model, args.work / f"variant_{key}", bits, measurement, args.extra,
                               args.rows, args.ctx, {key: value})
    print("\n" + table(results, bits, base), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
