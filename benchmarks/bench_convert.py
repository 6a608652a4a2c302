"""Conversion speed on a GPU: exl2conv and (when importable) ExLlamaV2 0.3.2 on the same input.

    python benchmarks/bench_convert.py --smollm2 DIR          # SmolLM2-135M, default settings
    python benchmarks/bench_convert.py --smollm2 DIR --full   # the same as one job per tool
    python benchmarks/bench_convert.py --llama7b-layers 4     # random weights, Llama-2-7B layer shapes
    python benchmarks/bench_convert.py --llama7b-layers 2,6 --measure-only
    python benchmarks/bench_convert.py --llama70b-layers 2     # hidden 8192, 64/8 heads
    python benchmarks/bench_convert.py --qwen3moe-layers 2,4   # 128 experts, 8 active

Prints a table: wall time of the measurement pass and of the quantization pass, seconds per layer
for each, peak GPU memory and peak RSS, and the ratio exl2conv / ExLlamaV2 for each figure.
Each tool runs twice: measurement only (-om), then quantization reusing that measurement (-m)
(``--measure-only``: the first alone).

Seconds per layer are each job's whole wall time over its layers, so they carry the process's
fixed costs (importing torch, about 5 s on an H100 host; reading the model; calibration; our
sensitivity stage; page-locking host buffers) spread over few layers. Given two layer counts
(``--llama7b-layers 2,6``), the bench also prints the cost of one more layer: the difference of
the two runs' wall times over the difference of their layers, in which those fixed costs cancel.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Peak RSS as the job's summary reads it (exl2conv.report.peak_rss_gib, the process's own VmHWM):
# ru_maxrss would also count the pages a forked child shared with this (large) benchmark process
# before it called exec.
PEAK = ("import runpy, sys, torch, json, atexit\n"
        "def _r():\n"
        "    from exl2conv.report import peak_rss_gib\n"
        "    g = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_initialized() else 0.0\n"
        "    print('BENCH_PEAK ' + json.dumps({'gpu_gib': g, 'rss_gib': peak_rss_gib()}), flush=True)\n"
        "atexit.register(_r)\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def run(module: str, args: list[str], log: Path) -> dict:
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-c", PEAK, module, *args], stdout=f, stderr=subprocess.STDOUT,
                             cwd=REPO)
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace")
    peak = {"gpu_gib": float("nan"), "rss_gib": float("nan")}
    for m in re.finditer(r"BENCH_PEAK (\{.*\})", text):
        peak = json.loads(m.group(1))
    if rc != 0:
        print(text[-3000:])
        raise SystemExit(f"{module} failed (rc {rc}); log: {log}")
    return {"wall": wall, **peak}


# Random models with the shapes of real ones (random weights, the tiny byte-level tokenizer).
# qwen3moe: Qwen3-30B-A3B's layers (config.json of Qwen/Qwen3-30B-A3B): 128 experts of width 768,
# 8 routed per token, 32 query and 4 key/value heads of 128, q/k norms, with a 32k vocabulary so
# that the head does not dominate the figures. "MixtralForCausalLM" lays the same shapes out as
# Mixtral (no q/k norms, "block_sparse_moe.experts.<j>.w1/w3/w2").
SHAPES = {
    "llama7b": dict(arch="LlamaForCausalLM", hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128,
                    vocab=32000, eps=1e-5),
    # Llama-2-70B / Llama-3-70B layers (64 query and 8 key/value heads of 128), 32k vocabulary
    "llama70b": dict(arch="LlamaForCausalLM", hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128,
                     vocab=32000, eps=1e-5),
    "qwen3moe": dict(arch="Qwen3MoeForCausalLM", hidden=2048, intermediate=768, heads=32, kv_heads=4, head_dim=128,
                     vocab=32000, eps=1e-6, experts=128, top_k=8),
}


def _moe_names(arch: str) -> tuple[str, str, tuple[str, str, str]]:
    """(router, expert prefix, (gate, up, down) names) of an MoE layout."""
    if arch == "MixtralForCausalLM":
        return "block_sparse_moe.gate", "block_sparse_moe.experts", ("w1", "w3", "w2")
    return "mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj")


def make_model(path: Path, shape: str, layers: int, tokenizer_from: Path | None, arch: str | None = None) -> Path:
    """A random model of ``SHAPES[shape]`` with ``layers`` layers (``arch`` overrides its layout)."""
    import torch
    from safetensors.torch import save_file

    sh = dict(SHAPES[shape])
    arch = arch or sh["arch"]
    path.mkdir(parents=True, exist_ok=True)
    h, i, v, d = sh["hidden"], sh["intermediate"], sh["vocab"], sh["head_dim"]
    q, kv, experts = sh["heads"] * d, sh["kv_heads"] * d, sh.get("experts", 0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # drawn on the GPU: 128 experts take long on a CPU
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g, device=dev) * std).half().cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.float16)

    t = {"model.embed_tokens.weight": rnd(v, h, std=0.02), "model.norm.weight": ones(h),
         "lm_head.weight": rnd(v, h, std=0.02)}
    for n in range(layers):
        p = f"model.layers.{n}."
        t[p + "input_layernorm.weight"] = ones(h)
        t[p + "post_attention_layernorm.weight"] = ones(h)
        for name, rows, cols in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)):
            t[p + f"self_attn.{name}.weight"] = rnd(rows, cols, std=cols ** -0.5)
        if arch == "Qwen3MoeForCausalLM":
            t[p + "self_attn.q_norm.weight"] = ones(d)
            t[p + "self_attn.k_norm.weight"] = ones(d)
        if experts:
            router, prefix, (gate, up, down) = _moe_names(arch)
            t[p + router + ".weight"] = rnd(experts, h, std=h ** -0.5)
            for j in range(experts):
                e = f"{p}{prefix}.{j}."
                t[e + gate + ".weight"] = rnd(i, h, std=h ** -0.5)
                t[e + up + ".weight"] = rnd(i, h, std=h ** -0.5)
                t[e + down + ".weight"] = rnd(h, i, std=i ** -0.5)
        else:
            t[p + "mlp.gate_proj.weight"] = rnd(i, h, std=h ** -0.5)
            t[p + "mlp.up_proj.weight"] = rnd(i, h, std=h ** -0.5)
            t[p + "mlp.down_proj.weight"] = rnd(h, i, std=i ** -0.5)
    save_file(t, str(path / "model.safetensors"))
    cfg = {"architectures": [arch], "model_type": {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral",
                                                   "Qwen3MoeForCausalLM": "qwen3_moe"}[arch],
           "hidden_size": h, "intermediate_size": i, "num_attention_heads": sh["heads"],
           "num_key_value_heads": sh["kv_heads"], "head_dim": d, "num_hidden_layers": layers, "vocab_size": v,
           "rms_norm_eps": sh["eps"], "rope_theta": 10000.0, "max_position_embeddings": 4096, "hidden_act": "silu",
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}
    if experts:
        cfg.update(num_local_experts=experts, num_experts=experts, num_experts_per_tok=sh["top_k"],
                   moe_intermediate_size=i, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_from:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_from / f).exists():
                shutil.copy(tokenizer_from / f, path / f)
    else:
        sys.path.insert(0, str(REPO))
        from tests.tinymodel import make_tiny_llama  # its byte-level tokenizer
        tmp = Path(tempfile.mkdtemp())
        make_tiny_llama(tmp / "m")
        shutil.copy(tmp / "m" / "tokenizer.json", path / "tokenizer.json")
    return path


MODULES = {"exl2conv": "exl2conv", "ExLlamaV2": "exllamav2.conversion.convert_exl2"}


def tools(work: Path, names: list[str]):
    """(name, module, fresh working folder) of each tool named, in the order given."""
    for name in names:
        module = MODULES[name]
        w = work / name
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        yield name, module, w


def bench(model: Path, layers: int, work: Path, extra: list[str], names: list[str], quant: bool = True,
          ours: tuple[str, ...] = ()) -> dict:
    """Each tool's measurement job and (``quant``) quantization job; ``ours``: flags for exl2conv's jobs only."""
    rows = {}
    for name, module, w in tools(work, names):
        flags = [*extra, *ours] if name == "exl2conv" else extra
        m = run(module, ["-i", str(model), "-o", str(w / "m"), "-om", str(w / "measurement.json"), *flags],
                w.parent / f"{name}_m.log")
        row = {"measure_s": m["wall"], "measure_per_layer": m["wall"] / layers, "gpu_gib": m["gpu_gib"],
               "rss_gib": m["rss_gib"]}
        # each job's figures as it ends: a bench stopped by a time limit still shows the jobs it finished
        print(f"  {name} measurement job: {m['wall']:.2f} s, GPU {m['gpu_gib']:.2f} GiB, RSS {m['rss_gib']:.2f} GiB",
              flush=True)
        if quant:
            q = run(module, ["-i", str(model), "-o", str(w / "q"), "-m", str(w / "measurement.json"), "-b", "4.0",
                             *flags], w.parent / f"{name}_q.log")
            print(f"  {name} quantization job: {q['wall']:.2f} s, GPU {q['gpu_gib']:.2f} GiB, "
                  f"RSS {q['rss_gib']:.2f} GiB", flush=True)
            row.update(quant_s=q["wall"], quant_per_layer=q["wall"] / layers, gpu_gib=max(m["gpu_gib"], q["gpu_gib"]),
                       rss_gib=max(m["rss_gib"], q["rss_gib"]))
        rows[name] = row
    return rows


def marginal(lo: int, hi: int, rows_lo: dict, rows_hi: dict) -> dict:
    """Seconds of one more layer for each tool and pass: ``(T(hi) - T(lo)) / (hi - lo)``."""
    out = {}
    for name in rows_lo:
        out[name] = {f"{k}_per_extra_layer": (rows_hi[name][f"{k}_s"] - rows_lo[name][f"{k}_s"]) / (hi - lo)
                     for k in ("measure", "quant") if f"{k}_s" in rows_lo[name]}
    return out


def bench_full(model: Path, work: Path, names: list[str]) -> dict:
    """One default job per tool, measurement and quantization in one process (-b 4.0, -cf):
    what a user runs."""
    rows = {}
    for name, module, w in tools(work, names):
        r = run(module, ["-i", str(model), "-o", str(w / "work"), "-cf", str(w / "out"), "-b", "4.0"],
                w.parent / f"{name}_full.log")
        rows[name] = {"job_s": r["wall"], "gpu_gib": r["gpu_gib"], "rss_gib": r["rss_gib"]}
    return rows


def table(title: str, rows: dict) -> str:
    first = next(iter(rows.values()))
    keys = [k for k in ["job_s", "measure_s", "quant_s", "measure_per_layer", "quant_per_layer",
                        "measure_per_extra_layer", "quant_per_extra_layer", "gpu_gib", "rss_gib"] if k in first]
    out = [f"\n{title}", f"{'figure':24s}" + "".join(f"{n:>12s}" for n in rows) + ("   ratio" if len(rows) == 2 else "")]
    for k in keys:
        vals = [rows[n][k] for n in rows]
        line = f"{k:24s}" + "".join(f"{v:12.2f}" for v in vals)
        if len(vals) == 2 and vals[1]:
            line += f"   {vals[0] / vals[1]:.3f}"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", type=Path, help="SmolLM2-135M FP16 folder (exl2conv.smollm2.smollm2_fp16)")
    ap.add_argument("--llama7b-layers", default="", help="layers of a random Llama-2-7B-shaped model; two counts "
                    "(e.g. 2,6) also give the cost of one more layer")
    ap.add_argument("--llama70b-layers", default="", help="layers of a random 70B-class model (hidden 8192, "
                    "intermediate 28672, 64 query and 8 key/value heads); counts as for --llama7b-layers")
    ap.add_argument("--qwen3moe-layers", default="", help="layers of a random Qwen3-30B-A3B-shaped model (128 "
                    "experts, 8 active); two counts as for --llama7b-layers")
    ap.add_argument("--moe-arch", default=None, choices=("Qwen3MoeForCausalLM", "MixtralForCausalLM"),
                    help="the layout of the Qwen3-30B-A3B-shaped model (default Qwen3MoeForCausalLM)")
    ap.add_argument("--measure-only", action="store_true", help="random models: the measurement job alone")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "exl2conv-bench")
    ap.add_argument("--no-exllamav2", action="store_true", help="time exl2conv alone")
    ap.add_argument("--exl2conv-flags", default="",
                    help="random models: more flags for exl2conv's jobs, e.g. \"-d 0\" (one split string)")
    ap.add_argument("--only-exllamav2", action="store_true",
                    help="time ExLlamaV2 alone: for a model whose ExLlamaV2 jobs need a device call of their own "
                         "(the random models are seeded, so two calls see the same input)")
    ap.add_argument("--full", action="store_true",
                    help="SmolLM2: one default job per tool (measurement and quantization in one process) "
                         "instead of a measurement job and a quantization job")
    args = ap.parse_args()
    try:
        import exllamav2  # noqa: F401
        have = not args.no_exllamav2
    except ImportError:
        if args.only_exllamav2:
            raise SystemExit("--only-exllamav2: exllamav2 is not importable here")
        have = False
    names = ["ExLlamaV2"] if args.only_exllamav2 else ["exl2conv", "ExLlamaV2"] if have else ["exl2conv"]
    if args.smollm2 and args.full:
        print(table("SmolLM2-135M, one default job (-b 4.0)", bench_full(args.smollm2, args.work / "smolfull", names)),
              flush=True)
    elif args.smollm2:
        print(table("SmolLM2-135M, default settings (-b 4.0)", bench(args.smollm2, 30, args.work / "smol", [], names)), flush=True)
    for shape, spec, title in (("llama7b", args.llama7b_layers, "Llama-2-7B shapes"),
                               ("llama70b", args.llama70b_layers, "70B-class shapes"),
                               ("qwen3moe", args.qwen3moe_layers, "Qwen3-30B-A3B shapes")):
        counts = [int(n) for n in spec.split(",") if n.strip()]
        if len(counts) > 2 or any(n < 1 for n in counts) or len(set(counts)) < len(counts):
            raise SystemExit(f"--{shape}-layers: one layer count, or two different ones (e.g. 2,6)")
        arch = args.moe_arch if shape == "qwen3moe" else None
        if arch:
            title += f" in {arch}'s layout"
        results = []
        for n in counts:
            model = make_model(args.work / f"{shape}-{n}", shape, n, args.smollm2, arch)
            rows = bench(model, n, args.work / f"{shape}-run-{n}", [], names, quant=not args.measure_only,
                         ours=tuple(args.exl2conv_flags.split()))
            results.append(rows)
            print(table(f"{title}, {n} layers, random weights (-b 4.0)", rows), flush=True)
            shutil.rmtree(model, ignore_errors=True)
        if len(counts) == 2:
            (lo, r_lo), (hi, r_hi) = sorted(zip(counts, results), key=lambda t: t[0])
            print(table(f"{title}, one more layer: (T({hi}) - T({lo})) / {hi - lo}", marginal(lo, hi, r_lo, r_hi)),
                  flush=True)

if __name__ == "__main__":
    main()
