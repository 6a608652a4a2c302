"""`exl2conv eval`: how close an EXL2 model is to its FP16 original.

The EXL2 weights are decoded exactly as ExLlamaV2's runtime dequantizes them, then both models run
in float32, layer by layer in lockstep over the same token windows; we report the quantized model's
perplexity, the mean KL divergence KL(FP16 || EXL2) per token, and top-1 agreement with FP16.
"""

from __future__ import annotations

import functools
import math
from contextlib import ExitStack
from pathlib import Path

import torch

from exl2conv.errors import Exl2Error, FormatError
from exl2conv.model import arch, forward
from exl2conv.qparams import MLP_INPUT_LINEARS
from exl2conv.model.config import load_config
from exl2conv.model.weights import WeightIndex, open_tensors
from exl2conv.pack import LINEAR_KEYS, decode_linear, mlp_bias_from_runtime_order

DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "eval" / "lcet10.txt"


class Exl2Weights:
    """Tensors of an EXL2 folder (or file) by name, decoded linears as float32 ``[out, in]``;
    tensors it lacks (the fixture holds linears only) come from the FP16 model. Callers name
    tensors by their source names; ``rename`` gives the name each has in the EXL2 files
    (arch.output_name: a Gemma3ForCausalLM's output sits under ``language_model.``)."""

    def __init__(self, path: Path, fallback: WeightIndex, stack: ExitStack, rename=None):
        self.rename = rename or (lambda name: name)
        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise Exl2Error(f"{path}: no .safetensors files; give an EXL2 model folder or file")
        self.where = open_tensors(files, stack)
        self.fallback = fallback

    def linear(self, name: str, out_features: int, device) -> torch.Tensor:
        name = self.rename(name)
        if f"{name}.q_weight" not in self.where:
            raise FormatError(f"{name}.q_weight is missing: the EXL2 model does not hold this linear")
        tensors = {k: self.where[f"{name}.{k}"].get_tensor(f"{name}.{k}")
                   for k in LINEAR_KEYS if f"{name}.{k}" in self.where}
        wt = decode_linear(tensors, name)
        return wt[:, :out_features].T.to(device=device, dtype=torch.float32)

    def bias(self, spec, specs: dict, device) -> torch.Tensor:
        """Linear ``spec``'s bias in the model's own order: a dense MLP's gate/up bias is stored in
        the order of its down projection's q_perm (:func:`pack.mlp_bias_to_runtime_order`)."""
        b = self.plain(f"{spec.name}.bias", device)
        down = specs.get("down_proj")
        if spec.short in MLP_INPUT_LINEARS and down is not None:
            inv = self.rename(f"{down.name}.q_invperm")
            if inv in self.where:
                b = mlp_bias_from_runtime_order(b, self.where[inv].get_tensor(inv).to(b.device))
        return b[: spec.out_features]

    def plain(self, name: str, device) -> torch.Tensor:
        out = self.rename(name)
        if out in self.where:
            return self.where[out].get_tensor(out).to(device=device, dtype=torch.float32)
        return self.fallback.get(name, device=device)


def text_windows(tok, text: str, ctx: int, rows: int) -> torch.Tensor:
    """The first ``rows`` windows of ``ctx`` tokens of ``text`` (no BOS), as ``[rows, ctx]``."""
    ids = tok.encode(text)
    have = len(ids) // ctx
    if have == 0:
        raise Exl2Error(f"the evaluation text has {len(ids)} tokens, fewer than one window of {ctx}; "
                        "give a longer text or a smaller --ctx")
    rows = min(rows, have)
    return torch.tensor(ids[: rows * ctx], dtype=torch.long).view(rows, ctx)


@torch.inference_mode()
def evaluate(exl2_path: Path, fp16_dir: Path, ids: torch.Tensor, device: str | None = None,
             runtime_dtype: torch.dtype | None = None) -> dict:
    """ids: ``[W, L]`` token windows. Returns ppl, kl, top1 (and fp16_ppl) as floats.

    ``runtime_dtype``: also run the EXL2 folder through the runtime (:mod:`exl2conv.runtime`, its
    activations in that dtype) and add ``runtime``: its ppl, kl and top1 against FP16 as above, and
    how far its logits are from the decoded forward's (:func:`runtime_agreement`)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runtime = _runtime_model(exl2_path, dev, runtime_dtype) if runtime_dtype is not None else None
    cfg = load_config(fp16_dir)
    ref = WeightIndex(fp16_dir)
    with ExitStack() as stack:
        q = Exl2Weights(exl2_path, ref, stack, rename=lambda name: arch.output_name(cfg, name))
        emb_ref = ref.get(arch.embedding_tensor(cfg), device=dev)
        pos = arch.position_tensor(cfg)
        x_ref = forward.embed(ids.to(dev), emb_ref, cfg.embed_scale, forward.load_positions(ref, cfg, dev))
        x_q = forward.embed(ids.to(dev), q.plain(arch.embedding_tensor(cfg), dev), cfg.embed_scale,
                            q.plain(pos, dev) if pos else None)
        del emb_ref
        rope = forward.rope_tables(cfg, ids.shape[1], dev)
        for i in range(cfg.num_layers):
            for part in forward.layer_parts(cfg):
                w_ref = forward.load_layer_weights(ref, cfg, i, part, dev)
                w_q = quantized_weights(q, cfg, i, part, dev)
                fn = functools.partial(forward.BLOCKS[part], layer=i)
                x_ref = _batched(fn, x_ref, w_ref, cfg, rope)
                x_q = _batched(fn, x_q, w_q, cfg, rope)
        norm_name = arch.final_norm_tensor(cfg)
        g, b = forward.load_final_norm(ref, cfg, dev)
        x_ref = forward.final_norm(x_ref, g, cfg, b)
        bias = arch.norm_bias_tensor(cfg, norm_name)
        x_q = forward.final_norm(x_q, q.plain(norm_name, dev) + cfg.norm_offset, cfg,
                                 q.plain(bias, dev) if bias else None)
        head = arch.head_spec(cfg, ref)
        w_head_ref = forward.load_head(ref, cfg, dev)
        w_head_q = q.linear(head.name, head.out_features, dev)
        return _scores(x_ref, x_q, w_head_ref, w_head_q, ids.to(dev), cfg, runtime)


def quantized_weights(q: Exl2Weights, cfg, i: int, part: str, dev) -> dict[str, torch.Tensor]:
    """The float32 tensors :data:`forward.BLOCKS` takes for layer ``i``'s ``part``, from the EXL2
    files: keyed as :func:`forward.load_layer_weights` keys the FP16 model's."""
    w: dict[str, torch.Tensor] = {}
    specs = forward.block_linears(cfg, i, part)
    for key, name in forward.block_norm_weights(cfg, i, part).items():
        if key.endswith(".bias"):  # a LayerNorm's bias
            w[key] = q.plain(name, dev)
        else:  # a norm, stored without the architecture's offset
            w[key] = q.plain(name, dev) + cfg.norm_offset
    router = arch.router_tensor(cfg, i) if part == "mlp" else None
    if router:  # MoE router, stored as is
        w[arch.spec_of(cfg).moe_router] = q.plain(router, dev)
    for short, spec in specs.items():
        w[short] = q.linear(spec.name, spec.out_features, dev)
        if spec.bias:  # stored padded in the EXL2 tensors
            w[f"{short}.bias"] = q.bias(spec, specs, dev)
    return w


class _Missing:
    """The fallback of an EXL2 folder read on its own: every tensor must be in its files."""

    def get(self, name: str, device=None):
        raise FormatError(f"{name} is missing from the EXL2 model")


@torch.inference_mode()
def decoded_logits(exl2_dir: Path, ids: torch.Tensor, device: str | None = None) -> torch.Tensor:
    """The EXL2 model of ``exl2_dir`` alone (its config.json and files) on ``ids`` [B, L], decoded and
    run in float32 exactly as :func:`evaluate` runs it: f32 logits [B, L, vocab_size]. The
    reference the runtime (:mod:`exl2conv.runtime`) is checked against."""
    dev = torch.device(device or "cpu")
    cfg = load_config(exl2_dir)
    with ExitStack() as stack:
        q = Exl2Weights(exl2_dir, _Missing(), stack, rename=lambda name: arch.output_name(cfg, name))
        pos = arch.position_tensor(cfg)
        x = forward.embed(ids.to(dev), q.plain(arch.embedding_tensor(cfg), dev), cfg.embed_scale,
                          q.plain(pos, dev) if pos else None)
        rope = forward.rope_tables(cfg, ids.shape[1], dev)
        for i in range(cfg.num_layers):
            for part in forward.layer_parts(cfg):
                fn = functools.partial(forward.BLOCKS[part], layer=i)
                x = _batched(fn, x, quantized_weights(q, cfg, i, part, dev), cfg, rope)
        norm_name = arch.final_norm_tensor(cfg)
        bias = arch.norm_bias_tensor(cfg, norm_name)
        x = forward.final_norm(x, q.plain(norm_name, dev) + cfg.norm_offset, cfg,
                               q.plain(bias, dev) if bias else None)
        head = f"{arch.spec_of(cfg).prefix}{arch.spec_of(cfg).head}"
        return forward.logits(x, q.linear(head, cfg.vocab_size, dev), cfg)[..., :cfg.vocab_size]


def _batched(fn, x: torch.Tensor, w: dict, cfg, rope, chunk: int = 4) -> torch.Tensor:
    out = torch.empty_like(x)
    for r in range(0, x.shape[0], chunk):
        out[r:r + chunk], _ = fn(x[r:r + chunk], w, cfg, rope)
    return out


def _runtime_model(exl2_path: Path, dev, dtype: torch.dtype):
    from exl2conv.runtime import Exl2ForCausalLM

    if not Path(exl2_path).is_dir():
        raise Exl2Error(f"{exl2_path}: --runtime loads an EXL2 model folder (config.json and its shards), "
                        "not a single file")
    return Exl2ForCausalLM.from_quantized(exl2_path, device=dev, dtype=dtype)


class _Tally:
    """Perplexity, KL(reference || other) and top-1 agreement, accumulated window by window."""

    def __init__(self):
        self.kl = self.nll = self.nll_ref = 0.0
        self.agree = self.tokens = self.preds = 0

    def add(self, lp_ref: torch.Tensor, lp: torch.Tensor, tgt: torch.Tensor) -> None:
        """lp_ref, lp: f32 log-probabilities [L, vocab]; tgt: the next tokens [L - 1, 1]."""
        self.kl += float((lp_ref.exp() * (lp_ref - lp)).sum(dim=-1).double().sum())
        self.agree += int((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        self.nll -= float(lp[:-1].gather(-1, tgt).double().sum())
        self.nll_ref -= float(lp_ref[:-1].gather(-1, tgt).double().sum())
        self.tokens += lp.shape[0]
        self.preds += tgt.shape[0]

    def result(self) -> dict:
        return {"ppl": math.exp(self.nll / self.preds), "fp16_ppl": math.exp(self.nll_ref / self.preds),
                "kl": self.kl / self.tokens, "top1": self.agree / self.tokens}


def _scores(x_ref, x_q, w_ref, w_q, ids, cfg, runtime=None) -> dict:
    vocab = cfg.vocab_size
    decoded, through_runtime, agreement = _Tally(), _Tally(), RuntimeAgreement()
    for r in range(ids.shape[0]):
        lr = forward.logits(x_ref[r:r + 1], w_ref, cfg)[0, :, :vocab]
        lq = forward.logits(x_q[r:r + 1], w_q, cfg)[0, :, :vocab]
        lp_r = torch.log_softmax(lr, dim=-1)
        tgt = ids[r, 1:].unsqueeze(-1)
        decoded.add(lp_r, torch.log_softmax(lq, dim=-1), tgt)
        if runtime is not None:
            lt = runtime(ids[r:r + 1]).logits[0, :, :vocab].float()
            through_runtime.add(lp_r, torch.log_softmax(lt, dim=-1), tgt)
            agreement.add(lq, lt)
    out = decoded.result()
    if runtime is not None:
        rt = through_runtime.result()
        out["runtime"] = {"ppl": rt["ppl"], "kl": rt["kl"], "top1": rt["top1"],
                          "dtype": str(runtime.dtype).removeprefix("torch."), **agreement.result()}
    return out


class RuntimeAgreement:
    """The runtime's logits against the float32 decoded forward's, on the same windows:
    ``logit_err``, the largest difference relative to the largest decoded logit (FP16 noise is
    ~5e-3 for fp16 activations, ~1e-6 for float32: tests/e2e/test_runtime.py), and ``top1_vs_decoded``,
    how often both pick the same token."""

    def __init__(self):
        self.diff = self.scale = 0.0
        self.agree = self.tokens = 0

    def add(self, decoded: torch.Tensor, runtime: torch.Tensor) -> None:
        """decoded, runtime: f32 logits [L, vocab] of one window."""
        self.diff = max(self.diff, float((runtime - decoded).abs().max()))
        self.scale = max(self.scale, float(decoded.abs().max()))
        self.agree += int((decoded.argmax(-1) == runtime.argmax(-1)).sum())
        self.tokens += decoded.shape[0]

    def result(self) -> dict:
        return {"logit_err": self.diff / self.scale, "max_logit": self.scale,
                "top1_vs_decoded": self.agree / self.tokens}
