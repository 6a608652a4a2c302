"""Inference speed of the exl2conv runtime (Exl2ForCausalLM, its CUDA kernels) beside ExLlamaV2 0.3.2
(when importable) on the same EXL2 folder, on a GPU.

    python benchmarks/bench_runtime.py --model OUT_DIR               # an EXL2 folder (e.g. SmolLM2's output)
    python benchmarks/bench_runtime.py --llama7b-layers 32           # a random Llama-2-7B-shaped EXL2 folder
    python benchmarks/bench_runtime.py --model A --model B --llama7b-layers 32 --only exl2conv

For each folder and runtime, in a process of its own (so that its peak GPU memory is its own):

* decode: batch 1, a 32-token prompt through the cache, then ``--decode-tokens`` single-token
  forwards (greedy input, the argmax of each step): new tokens per second;
* prefill: one forward of ``--prefill`` tokens (2048) into an empty cache, logits of the last
  position only: prompt tokens per second;
* exl2conv also: the same decode through a static cache, each step replayed as a CUDA graph
  (exl2conv.runtime.graphed.StaticDecoder); and the decode step's quantized linears alone (every
  Exl2Linear once on one row, in model order): the tokens per second the linears would allow,
  which separates the kernels from the transformers model's own per-token overhead (attention,
  norms, Python);
* peak GPU memory (torch's max allocated) after loading and after the runs;
* with ``--profile``, torch.profiler's table of 8 decode steps of each runtime (where a host-bound
  loop spends its time).

The random Llama-2-7B folder is packed directly (tests/randexl2.py: random codes and scales, 10 %
5-bit + 90 % 4-bit in groups of 32 for the layers, the default 6-bit head layout), not converted:
speed does not depend on the values, and a 32-layer conversion would take most of an hour.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPT = 32


# -- a random Llama-2-7B-shaped EXL2 folder ---------------------------------------------------------


def make_llama7b(path: Path, layers: int) -> Path:
    """A Llama-2-7B-shaped EXL2 folder of ``layers`` layers with random packed weights
    (tests/randexl2.py)."""
    from bench_convert import SHAPES
    from tests.randexl2 import make_random_exl2

    sh = SHAPES["llama7b"]
    return make_random_exl2(path, sh["hidden"], sh["intermediate"], sh["heads"], sh["kv_heads"], sh["vocab"],
                            layers, sh["head_dim"], sh["eps"])


# -- one runtime, in its own process ----------------------------------------------------------------


def _timed(fn) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def _profile(fn) -> str:
    """torch.profiler's table of ``fn`` (a short decode), the 20 entries of most host time: where
    a host-bound loop spends its time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60)


def run_exl2conv(folder: Path, decode_tokens: int, prefill: int, profile: bool = False) -> dict:
    import torch

    from exl2conv import kernels
    from exl2conv.runtime import Exl2ForCausalLM, Exl2Linear

    assert kernels.get() is not None, "the CUDA extension did not build: this would time the torch fallback"
    model = Exl2ForCausalLM.from_quantized(folder, device="cuda", dtype=torch.float16)
    loaded = _gib()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0)).cuda()

    # transformers 5.25 renamed the forward's past_key_values to cache (the old name warns)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def decode(steps):
        out = model(input_ids=ids[:, :PROMPT], use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=nxt, use_cache=True, **{cache_arg: cache})
            nxt = out.logits[:, -1:].argmax(-1)
            nxt.cpu()  # a generator reads each token on the host (EOS, streaming), as ExLlamaV2's loop below

    @torch.inference_mode()
    def prefill_once():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)

    decode(4)  # warm-up: kernels built and loaded, cuBLAS handles, allocator
    prompt_s = _timed(lambda: decode(0))
    decode_s = _timed(lambda: decode(decode_tokens)) - prompt_s
    profiled = _profile(lambda: decode(8)) if profile else None
    prefill_once()
    prefill_s = _timed(prefill_once)
    linears = [m for m in model.modules() if isinstance(m, Exl2Linear)]
    rows = {m.in_features: torch.randn(1, m.in_features, device="cuda", dtype=torch.float16) for m in linears}

    @torch.inference_mode()
    def linears_once():
        for m in linears:
            m(rows[m.in_features])

    linears_once()
    lin_s = _timed(lambda: [linears_once() for _ in range(10)]) / 10
    res = {"decode_tok_s": decode_tokens / decode_s, "prefill_tok_s": prefill / prefill_s,
           "linears_only_tok_s": 1 / lin_s, "gpu_gib_loaded": loaded, "profile": profiled}

    # the same decode through a static cache, each step replayed as a CUDA graph; last, so that a
    # failed capture loses no other figure
    try:
        from exl2conv.runtime.graphed import StaticDecoder

        dec = StaticDecoder(model, PROMPT + decode_tokens + 8, graph=True)

        def graphed(steps):
            nxt = dec.prefill(ids[:, :PROMPT]).argmax(-1)
            for _ in range(steps):
                nxt = dec.step(nxt).argmax(-1)
                nxt.cpu()

        graphed(4)  # captures the graph
        g_prompt_s = _timed(lambda: graphed(0))
        res["graphed_decode_tok_s"] = decode_tokens / (_timed(lambda: graphed(decode_tokens)) - g_prompt_s)
    except Exception as exc:  # reported, not fatal: the eager figures stand
        res["graphed_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    res["gpu_gib_peak"] = _gib()
    return res


def run_exllamav2(folder: Path, decode_tokens: int, prefill: int, profile: bool = False) -> dict:
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(str(folder))
    config.max_seq_len = max(prefill, PROMPT + decode_tokens + 8)
    config.max_input_len = prefill
    config.max_attention_size = prefill ** 2
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
    model.load_autosplit(cache)
    loaded = _gib()
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def decode(steps):
        cache.current_seq_len = 0
        logits = model.forward(ids[:, :PROMPT], cache, last_id_only=True)
        nxt = logits[:, -1:].argmax(-1).cpu()
        for _ in range(steps):
            logits = model.forward(nxt, cache)
            nxt = logits[:, -1:].argmax(-1).cpu()

    @torch.inference_mode()
    def prefill_once():
        cache.current_seq_len = 0
        model.forward(ids, cache, last_id_only=True)

    decode(4)
    prompt_s = _timed(lambda: decode(0))
    decode_s = _timed(lambda: decode(decode_tokens)) - prompt_s
    profiled = _profile(lambda: decode(8)) if profile else None
    prefill_once()
    prefill_s = _timed(prefill_once)
    return {"decode_tok_s": decode_tokens / decode_s, "prefill_tok_s": prefill / prefill_s,
            "gpu_gib_loaded": loaded, "gpu_gib_peak": _gib(), "profile": profiled}


RUNNERS = {"exl2conv": run_exl2conv, "exllamav2": run_exllamav2}


def child(args) -> None:
    res = RUNNERS[args.child](Path(args.model[0]), args.decode_tokens, args.prefill, args.profile)
    print("BENCH_RESULT " + json.dumps(res), flush=True)


def spawn(runtime: str, folder: Path, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", runtime, "--model", str(folder),
           "--decode-tokens", str(args.decode_tokens), "--prefill", str(args.prefill)]
    if args.profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    print(f"{runtime} on {folder} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return None


# -- the table --------------------------------------------------------------------------------------

FIELDS = (("decode_tok_s", "decode tok/s (batch 1)"), ("graphed_decode_tok_s", "  CUDA graph, tok/s"),
          ("linears_only_tok_s", "  linears alone, tok/s"),
          ("prefill_tok_s", "prefill tok/s"), ("gpu_gib_loaded", "GPU GiB after load"),
          ("gpu_gib_peak", "GPU GiB peak"))


def table(folder: Path, results: dict) -> str:
    names = list(results)
    lines = [f"\n{folder}", f"{'':28}" + "".join(f"{n:>14}" for n in names)
             + ("   exl2conv/ExLlamaV2" if len(names) == 2 else "")]
    for key, label in FIELDS:
        vals = [results[n].get(key) if results[n] else None for n in names]
        row = f"{label:28}" + "".join(f"{v:14.2f}" if v is not None else f"{'-':>14}" for v in vals)
        if len(names) == 2 and None not in vals and vals[1]:
            row += f"   {vals[0] / vals[1]:.2f}x"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="an EXL2 folder (repeatable)")
    ap.add_argument("--llama7b-layers", type=int, help="also a random Llama-2-7B-shaped EXL2 folder of N layers")
    ap.add_argument("--work", type=Path, help="where to write the random folder (default: a temporary folder)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--only", choices=tuple(RUNNERS), help="one runtime only")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's table of 8 decode steps of each runtime (host time per op)")
    ap.add_argument("--child", choices=tuple(RUNNERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    folders = [Path(m) for m in args.model]
    if args.llama7b_layers:
        work = args.work or Path(tempfile.mkdtemp(prefix="bench_runtime_"))
        t0 = time.monotonic()
        folders.append(make_llama7b(work / f"llama7b_{args.llama7b_layers}l_exl2", args.llama7b_layers))
        print(f"packed a random Llama-2-7B-shaped EXL2 folder in {time.monotonic() - t0:.0f} s: {folders[-1]}")
    if not folders:
        ap.error("give --model DIR and/or --llama7b-layers N")
    runtimes = [args.only] if args.only else list(RUNNERS)
    if "exllamav2" in runtimes:
        try:
            import exllamav2  # noqa: F401
        except ImportError:
            print("exllamav2 is not importable: exl2conv alone")
            runtimes.remove("exllamav2")
    for folder in folders:
        results = {r: spawn(r, folder, args) for r in runtimes}
        print(table(folder, results), flush=True)
        for name, res in results.items():
            if res and res.get("profile"):
                print(f"\n{name}, 8 decode steps under torch.profiler:\n{res['profile']}", flush=True)
            if res and res.get("graphed_error"):
                print(f"{name}: the CUDA-graph decode failed: {res['graphed_error']}", flush=True)


if __name__ == "__main__":
    main()
