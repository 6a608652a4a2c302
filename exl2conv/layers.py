"""The module list and running one module over the calibration states.

Modules are indexed as ExLlamaV2 indexes them (its model.py, ExLlamaV2.__init__, builds
``model.modules`` in this order), because measurement.json's ``last_module_idx`` and the job's
checkpoints count in these indices: 0 the embedding, then an attention and an MLP per layer, then
the final norm and the head (``2L + 2`` for L layers).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from exl2conv import settings, stop
from exl2conv.gptq import GPTQ_BYTES, Filler, Hessian, Prepared, quantize_batches
from exl2conv.memory import Copier
from exl2conv.metrics import feed, relative_errors
from exl2conv.model import attention_kernels, forward
from exl2conv.model.arch import LinearSpec
from exl2conv.model.config import ModelConfig

MODES = {"embed": None, "pos_emb": "pos_emb", "attn": "self_attn", "mlp": "mlp", "norm": "norm", "head": "linear",
         "parallel": "parallel_decoder"}
MOE_MODE = "block_sparse_moe"


@dataclass(frozen=True)
class Module:
    index: int
    kind: str          # embed | pos_emb | attn | mlp | parallel | norm | head
    key: str           # "model.layers.3", "model.norm", "lm_head"
    layer: int | None = None
    # an MoE MLP: same kind (it runs and quantizes as the MLP slot), ExLlamaV2's own mode
    moe: bool = False

    @property
    def mode(self) -> str | None:
        return MOE_MODE if self.moe and self.kind == "mlp" else MODES[self.kind]

    @property
    def meas_key(self) -> str:
        """The module's key in measurement.json (and in the job's strategy, but for a parallel
        block: :meth:`strategy_key`)."""
        return f"{self.key}.{self.mode}"

    @property
    def quantized(self) -> bool:
        """Whether the module holds linears that the measurement and the quantization handle."""
        return self.kind in ("attn", "mlp", "parallel")

    @property
    def parts(self) -> tuple[str, ...]:
        """The option tables a quantized module is measured on and solved over, one slot each: its
        kind, or a parallel block's "attn" then "mlp"."""
        return ("attn", "mlp") if self.kind == "parallel" else (self.kind,)

    def strategy_key(self, part: str) -> str:
        """The job strategy's key of ``part``'s chosen entry: the module's measurement key, and for
        a parallel block ExLlamaV2's "<layer>.self_attn" and "<layer>.mlp" (its convert.py keys the
        strategy of a parallel decoder so)."""
        if self.kind != "parallel":
            return self.meas_key
        return f"{self.key}.{MODES[part]}"


def module_list(num_layers: int, layers_prefix: str = "model.layers", norm_key: str = "model.norm",
                head_key: str = "lm_head", embed_key: str = "model.embed_tokens",
                moe: bool = False, positions_key: str | None = None, parallel: bool = False) -> list[Module]:
    """``moe``: the MLPs are MoE blocks, keyed ``<layer>.block_sparse_moe`` (ExLlamaV2's
    conversion/measure.py, measure_quant, keys each module's entry ``<module key>.<mode>``).
    ``positions_key``: a learned position table's module (GPTBigCode's ``model.wpe``), which
    ExLlamaV2 lists after the embedding: it shifts every later module's index, and its
    measurement entry is null. ``parallel``: each layer is one module, attention and MLP side by
    side (Cohere), keyed ``<layer>.parallel_decoder`` as ExLlamaV2 keys it (``1 + L + 2`` modules)."""
    mods = [Module(0, "embed", embed_key)]
    if positions_key:
        mods.append(Module(1, "pos_emb", positions_key))
    for i in range(num_layers):
        if parallel:
            mods.append(Module(len(mods), "parallel", f"{layers_prefix}.{i}", i))
            continue
        mods.append(Module(len(mods), "attn", f"{layers_prefix}.{i}", i))
        mods.append(Module(len(mods), "mlp", f"{layers_prefix}.{i}", i, moe=moe))
    mods.append(Module(len(mods), "norm", norm_key))
    mods.append(Module(len(mods), "head", head_key))
    return mods


def module_linears(cfg, mod: Module, part: str | None = None) -> dict:
    """The linears of a quantized module, or of one ``part`` (a slot) of it: a parallel block's
    "attn" or "mlp" branch, all of them without ``part``."""
    return forward.block_linears(cfg, mod.layer, part or mod.kind)


def padded_wt(w: torch.Tensor, spec: LinearSpec, perm: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """HF weight ``[out, in]`` -> ``Wt`` ``[K, N]`` float32 with zero columns up to the padded N;
    with ``perm`` (on ``w``'s device), its rows in that order (``Wt[perm]``), gathered a slice at a
    time (no whole-size temporary); written into ``out`` when given."""
    if out is None:
        wt = torch.zeros(spec.in_features, spec.padded_out, dtype=torch.float32, device=w.device)
    else:
        wt = out
        wt[:, spec.out_features:] = 0
    if perm is None:
        wt[:, : spec.out_features] = w.T.to(torch.float32)
        return wt
    step = max(1, (32 << 20) // (4 * spec.out_features))
    for r0 in range(0, spec.in_features, step):
        wt[r0:r0 + step, : spec.out_features] = w[:, perm[r0:r0 + step]].T
    return wt


def gptq_passes(w: torch.Tensor, spec: LinearSpec, prep: Prepared, settings: list,
                buffer: torch.Tensor | None = None) -> Iterator[list]:
    """GPTQ of every one of ``settings`` on one linear (``w``: its ``[out, in]`` weight), a pass of
    :data:`gptq.GPTQ_BYTES` at a time: yields each pass's results (``QuantResult``, rows in
    ``prep.perm`` order, padded columns), in the settings' order. Each pass starts from the padded
    weight in permuted row order (written into ``buffer`` when given). The caller drops a pass's
    list before asking for the next, so that one pass's results at a time are held."""
    perm = prep.perm.to(w.device)
    source = Filler((spec.in_features, spec.padded_out), w.device, lambda out: padded_wt(w, spec, perm, out), buffer)
    for batch in quantize_batches(source, prep, settings, keep_codes=False, max_bytes=GPTQ_BYTES):
        yield batch
        del batch


def padded_bias(b: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
    out = torch.zeros(spec.padded_out, dtype=torch.float16, device=b.device)
    out[: spec.out_features] = b.to(torch.float16)
    return out


@contextmanager
def module_matmuls(device: torch.device):
    """Lets a module's forward on CUDA multiply in TF32 on tensor cores: inputs rounded to 10
    mantissa bits (float16's precision, the precision ExLlamaV2 runs every forward in), products
    accumulated and returned in float32, the residual stream added in float32. It makes the
    calibration forwards 4-8x faster on a Hopper GPU. What it rounds is small next to the
    quantization error the forwards carry, and nothing that sums over the calibration data uses
    it: the Hessians, the error norms and the GPTQ arithmetic stay in full float32. The CPU path
    never uses it."""
    if device.type != "cuda" or not settings.active().tf32:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@contextmanager
def grad_pass(device: torch.device):
    """Where a forward and backward through modules run (the sensitivity stage, norm tweaking).

    On CUDA: TF32 matmuls as in :func:`module_matmuls`, and causal attention in float32 on
    :class:`attention_kernels.BlockedAttention` (query blocks against the keys they see, probabilities kept
    for a backward that adds its partial sums in a fixed order). PyTorch's float32 attention would
    otherwise run the memory-efficient kernel, whose backward adds partial gradients with atomics
    in whatever order the threads finish, so the same job gave other bytes run to run (also with
    torch's deterministic-algorithms switch in warn-only mode: tests/gpu/test_determinism.py);
    with that switch strictly on, it was slower than the blocked attention on SmolLM2's shapes
    (9.4 against 6.2 ms) and than the math kernels on Llama-2-7B's (10.1 against 4.5 ms;
    docs/performance.md). Attention with a mask (sliding windows) or softcapped scores runs
    PyTorch's "math" kernels. Both hold attention scores: callers keep their rows under
    :func:`grad_rows`. ``EXL2CONV_GRAD_ATTENTION=math`` runs the math kernels for all.

    ``EXL2CONV_HALF_ATTENTION=1`` runs causal attention in float16 on the flash kernels with their
    deterministic backward instead (:func:`attention_kernels.grad_attention`; float16 attention is what
    ExLlamaV2's runtime computes): on SmolLM2 the norm-tweak fits took a quarter of the time, but
    the KL from FP16 came out 0.7 % (4.0 bpw) and 1.7 % (6.0 bpw) higher on the same measurement
    (docs/performance.md), so it is not the default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with module_matmuls(device), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]), \
            attention_kernels.grad_attention(grad_attention(device)):
        yield


def grad_attention(device: torch.device) -> str:
    """How :func:`grad_pass` runs plain causal attention on ``device``: "half" (on CUDA with
    ``EXL2CONV_HALF_ATTENTION``), else ``EXL2CONV_GRAD_ATTENTION``'s "blocked" or "math"
    (:mod:`exl2conv.settings`)."""
    return "half" if half_attention_on(device) else settings.active().grad_attention


def half_attention_on(device: torch.device) -> bool:
    """Whether :func:`grad_pass` runs causal attention in float16 on ``device``."""
    return device.type == "cuda" and settings.active().half_attention


def grad_rows(cfg, length: int, device: torch.device, budget: int = 1 << 30) -> int | None:
    """Rows per :func:`grad_pass` call whose float32 attention probabilities take at most
    ``budget`` bytes (all ``L x L`` for the math kernels, the causal part for the blocked
    attention); None (no limit) where the flash kernels run every layer's attention."""
    plain = forward.plain_causal(cfg, length)
    mode = grad_attention(device)
    if mode == "half" and plain:
        return None
    per_head = length * length
    if device.type == "cuda" and plain and mode == "blocked":
        per_head = length * (length + min(length, attention_kernels.BLOCK)) // 2
    return max(1, budget // (cfg.num_heads * per_head * 4))


def block_forward(kind: str, x: torch.Tensor, w: dict, cfg, rope, capture: bool = False,
                  layer: int | None = None, hook: Callable | None = None):
    """Module ``kind`` ("attn", "mlp", "parallel") of decoder layer ``layer`` on ``x``: (outputs,
    intermediates or None); ``hook``: see :mod:`exl2conv.model.forward`."""
    with module_matmuls(x.device):
        return forward.BLOCKS[kind](x, w, cfg, rope, capture=capture, layer=layer, hook=hook)


@dataclass(frozen=True, eq=False)
class ModuleRun:
    """One attention, MLP or parallel module as a pass over the calibration states runs it.

    kind: its forward ("attn", "mlp", "parallel"); weights: its tensors by short name
    (:func:`forward.load_layer_weights`: float32, or a linear in its 2-byte source dtype,
    :meth:`WeightIndex.held_dtype`); specs: the linears that are measured or quantized
    (:func:`module_linears`: the module's, or one branch's of a parallel block); rope: a
    :class:`forward.RotaryCache` or a (cos, sin) pair; chunk: calibration rows per forward call;
    layer: the decoder layer (per-layer windows and RoPE depend on it); device: where the module
    runs when the states live elsewhere (host memory), None for the states' device; hook: computes
    every linear instead of the plain product (the measurement's candidate forwards)."""
    kind: str
    weights: dict[str, torch.Tensor]
    specs: dict[str, LinearSpec]
    cfg: ModelConfig
    rope: object
    chunk: int
    layer: int | None = None
    device: torch.device | None = None
    hook: Callable | None = None

    @classmethod
    def of(cls, mod: Module, weights: dict[str, torch.Tensor], cfg: ModelConfig, rope, chunk: int,
           device: torch.device | None = None, part: str | None = None) -> ModuleRun:
        """The run of quantized module ``mod``, its specs those of ``part`` (:func:`module_linears`)."""
        return cls(mod.kind, weights, module_linears(cfg, mod, part), cfg, rope, chunk, mod.layer, device)

    def replace(self, **changes) -> ModuleRun:
        """This run with the fields ``changes`` names replaced."""
        return dataclasses.replace(self, **changes)

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None, capture: bool = False):
        """The module on ``x`` with ``weights`` (default: its own): (outputs, intermediates or None)."""
        return block_forward(self.kind, x, self.weights if weights is None else weights, self.cfg, self.rope,
                             capture, self.layer, self.hook)


def run_block(run: ModuleRun, states: torch.Tensor, hessians: dict[str, Hessian] | None = None,
              ref: torch.Tensor | None = None, keep_output: bool = True, err_weight: torch.Tensor | None = None,
              ref_weights: dict | None = None, out: torch.Tensor | None = None,
              fisher: torch.Tensor | None = None, finite: list | None = None):
    """Run an attention or MLP module (``run``) over all rows of ``states`` ``[R, L, H]``,
    ``run.chunk`` rows at a time, on the states' device, or on ``run.device`` where it is another.

    hessians: intermediate name -> accumulator fed with that intermediate: its ``add_rows`` gets
    the chunk's tensor ``[B, ...]`` (a :class:`Hessian` counts B rows); an intermediate given as a
    list of per-row tensors (MoE, see :func:`forward.moe_mlp`) goes row by row to ``add``, and
    rows that are None are skipped, neither added nor counted.
    ref: when given, also returns each row's relative Frobenius error against it, with each
    hidden channel weighted by ``err_weight`` ``[H]`` when given (see :func:`error_weight`).
    ref_weights: instead of ``ref``, the weights whose outputs are the reference, run chunk by
    chunk beside ``run.weights`` (one more forward, no ``[R, L, H]`` reference held in memory).
    out: where the outputs go (may be ``states`` itself: each chunk is read before it is
    overwritten); by default a new tensor.
    fisher: ``[H]`` Fisher diagonal of the module's output (:mod:`exl2conv.sensitivity`); with it,
    errors are ``[R, 2]``: each row's relative error and its sum of ``F[c] e[t, c]^2``.
    Where the module runs on ``run.device`` and ``states`` (and ``out``) live elsewhere (host
    memory), each chunk is copied in, and its outputs copied back (a new ``out`` in pinned memory).
    finite: gets one boolean tensor per chunk, whether its outputs are all finite (checked on
    the device the module runs on, so that outputs in host memory need no second pass).
    Returns ``(outputs [R, L, H] or None, errors [R] or [R, 2] float64 or None)``."""
    rows, chunk, device = states.shape[0], run.chunk, run.device
    if keep_output and out is None:
        pin = device is not None and device.type == "cuda" and states.device.type == "cpu"
        out = torch.empty(states.shape, dtype=states.dtype, device=states.device, pin_memory=pin)
    elif not keep_output:
        out = None
    shape = (rows,) if fisher is None else (rows, 2)
    # on the device the module runs on, copied to the CPU once at the end
    errs = (torch.empty(shape, dtype=torch.float64, device=device or states.device)
            if ref is not None or ref_weights is not None else None)
    copier = Copier(states, out, device, chunk)
    for r0 in range(0, rows, chunk):
        stop.check()
        x = copier.rows_in(r0)
        y, inter = run.forward(x, capture=hessians is not None)
        if hessians is not None:
            for name, h in hessians.items():
                feed(h, inter[name])
            del inter
        if finite is not None:
            finite.append(torch.isfinite(y).all())
        if ref is not None:
            errs[r0:r0 + chunk] = relative_errors(y, ref[r0:r0 + chunk].to(y.device, non_blocking=True),
                                                  err_weight, fisher)
        elif ref_weights is not None:
            y_ref, _ = run.forward(x, ref_weights)
            errs[r0:r0 + chunk] = relative_errors(y, y_ref, err_weight, fisher)
            del y_ref
        if out is not None:
            copier.rows_out(r0, y)
    copier.finish()
    return out, (errs.cpu() if errs is not None else None)
