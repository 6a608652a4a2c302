"""`exl2conv generate MODEL_DIR --prompt TEXT`: stream a greedy continuation from an EXL2 model
through the runtime, then tokens per second and memory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from exl2conv.errors import Exl2Error

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exl2conv generate",
                                description="Load an EXL2 model folder with the exl2conv runtime (no ExLlamaV2) "
                                            "and stream a greedy continuation of a prompt.")
    p.add_argument("model_dir", type=str, help="EXL2 model folder (config.json, output*.safetensors, tokenizer)")
    p.add_argument("--prompt", type=str, required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--device", type=str, default="cpu", help="torch device (default cpu; on cuda with float16 the "
                   "linears run exl2conv's CUDA kernels)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="activations' dtype (default: float32 on the CPU, "
                   "where half arithmetic is slow, float16 elsewhere)")
    return p


def _streamer(tf, tok, out, skip_special: bool = False):
    """transformers' TextStreamer, writing to ``out`` (tests capture it) instead of print's stdout;
    ``skip_special`` leaves out special tokens (the end of a chat turn)."""

    class Streamer(tf.TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tok, skip_prompt=True, skip_special_tokens=skip_special)


def load(model_dir, device: torch.device, dtype: torch.dtype, cache_decoded: bool = False):
    """(model, tokenizer) of an EXL2 folder, through the runtime; ``cache_decoded`` keeps each
    decoded weight after the first forward (the torch path otherwise decodes every linear again
    for every new token)."""
    from exl2conv.runtime.model import Exl2ForCausalLM, _transformers

    model = Exl2ForCausalLM.from_quantized(model_dir, device=device, dtype=dtype, cache_decoded=cache_decoded)
    try:
        tok = _transformers().AutoTokenizer.from_pretrained(str(Path(model_dir)))
    except (OSError, ValueError) as exc:
        raise Exl2Error(f"{model_dir}: no tokenizer transformers can load ({exc})") from None
    return model, tok


def eos_ids(model, tok) -> set[int]:
    """The token ids that end a continuation: the generation config's (as generate() reads
    them), else the tokenizer's end of sequence."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


def stream(model, tok, prompt: str, max_new_tokens: int, out, skip_special: bool = False) -> tuple[int, float]:
    """Greedy continuation of ``prompt`` written to ``out`` as it comes (the prompt not repeated;
    special tokens left out with ``skip_special``); returns (new tokens, seconds).

    Where the model's step allows it (:func:`exl2conv.runtime.graphed.capturable`), through a
    static cache, each step replayed as a CUDA graph on a GPU (StaticDecoder); otherwise through
    transformers' generate(). Both give the same greedy tokens."""
    from exl2conv.runtime.graphed import StaticDecoder, capturable
    from exl2conv.runtime.model import _transformers

    ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
    streamer = _streamer(_transformers(), tok, out, skip_special)
    start = time.perf_counter()
    if capturable(model) is None:
        decoder = StaticDecoder(model, ids.shape[1] + max_new_tokens)
        streamer.put(ids.cpu())  # the prompt: skipped by the streamer, as generate() hands it over first
        tokens = decoder.greedy(ids, max_new_tokens, eos_ids(model, tok),
                                on_token=lambda t: streamer.put(torch.tensor([t])))
        streamer.end()
        return len(tokens), time.perf_counter() - start
    with torch.inference_mode():
        row = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=streamer,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return row.shape[1] - ids.shape[1], time.perf_counter() - start


def run_generate(argv: list[str], out=None) -> int:
    from exl2conv.report import peak_rss_gib

    out = out or sys.stdout
    args = generate_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise Exl2Error(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "float16")]
    model, tok = load(args.model_dir, device, dtype)
    out.write(args.prompt)
    new, seconds = stream(model, tok, args.prompt, args.max_new_tokens, out)
    mem = f"peak RSS {peak_rss_gib():.2f} GiB"
    if device.type == "cuda":
        mem += f", GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    out.write(f" -- {new} new tokens in {seconds:.2f} s (prefill included), {new / seconds:.1f} tokens/s; {mem}\n")
    return 0
