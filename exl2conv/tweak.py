"""Norm tweaking: after a module's linears are quantized, its input RMSNorm weight is adjusted so
that the quantized model's residual stream moves back towards the unquantized model's.

The RMSNorm weights stay float16 in an EXL2 model, so they are free parameters of the output
format: scaling channel ``c`` of the norm scales input column ``c`` of every linear the norm feeds
(q/k/v, or gate/up). Once those linears are quantized, a module's output on the quantized model's
inputs ``x_q`` differs from the unquantized model's output on its own inputs ``x``. The tweak
minimizes, over the norm weight ``g`` (one value per hidden channel),

    sum_rows || w * (module(x_q; g, quantized linears) - module_unquantized(x)) ||^2

with ``w`` the weight of the norm that next reads the residual (as the measured error,
:func:`metrics.error_weight`), by :data:`STEPS` Adam steps on a multiplicative ``g = g0 (1 + s)``
over the first calibration rows. The target is the unquantized model's own stream, so a module
can also take back part of the error that the modules before it left in the residual (a target of
the unquantized module on the quantized inputs was not tried on a real model). The best step is
kept, the initial weight included, so the loss on those rows never rises; the weight is rounded to
float16 as stored.

The final norm, which feeds the quantized head, is tweaked the same way after the head is
quantized, with the objective the evaluation measures: the mean KL divergence of the quantized
model's next-token distributions from the unquantized model's.

The fit takes :data:`STEPS` forwards and backwards of the module over its rows: on a GPU it
uses up to :data:`TOKENS` calibration tokens, fewer for large layers (:data:`WORK`), on a CPU
only :data:`CPU_TOKENS` (less gain, a bearable cost); ``EXL2CONV_TWEAK_TOKENS=N`` sets that
budget on either (to compare the two paths like for like, or to spend more on a CPU). On
SmolLM2-135M, quantizing from one measurement, the tweak lowered the KL from FP16 by 22 % at
2.5 bpw, 9 % at 4.0 and 4 % at 6.0 (docs/quality.md). ``EXL2CONV_NO_TWEAK=1`` turns it off. MoE
blocks are left alone: their norm also feeds the router.
"""

from __future__ import annotations

import math

import torch

from exl2conv import settings, stop
from exl2conv.layers import ModuleRun, grad_pass, module_matmuls
from exl2conv.model import forward
from exl2conv.model.arch import spec_of

TOKENS = 32768     # calibration tokens the tweak fits on (16 rows of 2048), at most
CPU_TOKENS = 512   # on a CPU: every step is a forward and a backward, ~100x the pass's own cost
# tokens x parameters of a layer, at most: the cost of the fit grows with both. SmolLM2-135M
# (3.5M per layer) gets all of TOKENS; a Llama-2-7B layer (202M) gets one row of 2048 tokens
# (16 rows took 8 s per layer on an H100, one row should take about a sixteenth of that).
WORK = TOKENS * 4_000_000
STEPS = 30
LR = 2e-3
# Positions per head forward in the final norm's fit: at most HEAD_TOKENS (a step holds about six
# [T, vocab] float32 tensors with the backward's: 1.25 GiB for a Llama-2-7B head at 2048, its
# quantization pass's peak), at least HEAD_MIN_TOKENS, and no more spans than HEAD_SPANS where
# that allows (each span is a few dozen kernel launches per step).
HEAD_TOKENS = 2048
HEAD_MIN_TOKENS = 512
HEAD_SPANS = 16


def head_span(n: int) -> int:
    """Positions per head forward for a fit on ``n`` positions: SmolLM2's 16 rows of 2048 go
    2048 at a time, a Llama-2-7B's one row 512 at a time."""
    return min(HEAD_TOKENS, max(HEAD_MIN_TOKENS, -(-n // HEAD_SPANS)))


def enabled() -> bool:
    return settings.active().tweak


def token_budget(device: torch.device) -> int:
    """The most calibration tokens the tweak fits on: ``EXL2CONV_TWEAK_TOKENS`` where set, else
    :data:`TOKENS` on a GPU and :data:`CPU_TOKENS` on a CPU."""
    tokens = settings.active().tweak_tokens
    if tokens is None:
        return TOKENS if device.type == "cuda" else CPU_TOKENS
    return tokens


def rows_for(rows: int, length: int, device: torch.device, layer_params: int) -> int:
    """Calibration rows the tweak uses: at most :func:`token_budget` tokens and :data:`WORK`
    tokens x ``layer_params`` (the weights of one decoder layer), at least one row."""
    tokens = min(token_budget(device), WORK // max(1, layer_params))
    return max(1, min(rows, tokens // max(1, length)))


def norm_key(kind: str, cfg) -> str:
    """The key (in the module's weight dict) of the norm that feeds the module's linears (a
    parallel block's one norm feeds both branches)."""
    spec = spec_of(cfg)
    return (spec.mlp_norms if kind == "mlp" else spec.attn_norms)[0]


def stored(g: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm weight as the forward uses it -> the float16 tensor the model file stores (the
    architecture's offset removed, Gemma's ``1 + w``)."""
    return (g - offset).to(torch.float16)


def as_stored(g: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm weight as the forward uses it, rounded to what the model file can store."""
    return stored(g, offset).to(torch.float32) + offset


class Adam:
    """Adam (Kingma and Ba; PyTorch's defaults: betas 0.9 and 0.999, eps 1e-8, no weight decay) on
    one tensor, the same arithmetic as ``torch.optim.Adam``'s single-tensor path. Its own because
    constructing ``torch.optim.Adam`` imports TorchDynamo, which cost 2.4 s of every conversion's
    start on a CPU machine and more on the GPU machine."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        grad = self.param.grad
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = self.lr / (1 - b1 ** self.steps)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - b2 ** self.steps)).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-step_size)


def _fit(loss_of, g0: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, float, float]:
    """Adam on ``g = g0 (1 + s)``; ``loss_of(g)`` runs the forward and backward (into ``g.grad``)
    and returns the loss, a float64 scalar tensor on ``g``'s device. Returns the best ``g`` seen
    (``g0`` included; the first of equal losses) and the losses at ``g0`` and at the best ``g``.
    Losses and tried values stay on the device until the end: no host sync per step, so a GPU
    queues the next step's kernels while it runs this one's."""
    s = torch.zeros_like(g0, requires_grad=True)
    opt = Adam(s, lr=lr)
    losses = torch.empty(steps + 1, dtype=torch.float64, device=g0.device)
    tried = torch.empty((steps + 1, *g0.shape), dtype=g0.dtype, device=g0.device)
    for step in range(steps + 1):
        stop.check()
        # a leaf that every chunk's backward adds into; then the chain rule into s
        g = (g0 * (1 + s.detach())).requires_grad_()
        with torch.enable_grad():
            losses[step] = loss_of(g)
        s.grad = g.grad * g0
        tried[step] = s.detach()
        if step < steps:
            opt.step()
    best = int(torch.argmin(losses.nan_to_num(nan=float("inf"))))
    return g0 * (1 + tried[best]), float(losses[0]), float(losses[best])


def tweak_norm(run: ModuleRun, x_q: torch.Tensor, target: torch.Tensor, err_weight: torch.Tensor | None,
               steps: int = STEPS, lr: float = LR) -> tuple[torch.Tensor, float, float]:
    """run: the module, its weights' linears quantized (decoded), ``run.chunk`` rows per forward
    and backward call; x_q: ``[S, L, H]`` the quantized model's inputs to the module; target:
    ``[S, L, H]`` the unquantized model's outputs of the module. Returns the norm weight (as the
    forward uses it, float16-exact as stored) and the relative loss before and after."""
    w, cfg, chunk = run.weights, run.cfg, run.chunk
    key = norm_key(run.kind, cfg)
    g0 = w[key].detach()
    cw = err_weight if err_weight is not None else torch.ones_like(g0)
    rows = range(0, x_q.shape[0], chunk)
    den = sum(float((target[r:r + chunk] * cw).square().sum()) for r in rows)

    def loss_of(g: torch.Tensor) -> torch.Tensor:
        wt = dict(w)
        wt[key] = g
        total = torch.zeros((), dtype=torch.float64, device=g.device)
        for r in rows:
            with grad_pass(x_q.device):
                y, _ = run.forward(x_q[r:r + chunk], wt)
                loss = ((y - target[r:r + chunk]) * cw).square().sum() / den
                loss.backward()
            total += loss.detach().double()
        return total

    g, first, best = _fit(loss_of, g0, steps, lr)
    return as_stored(g, cfg.norm_offset), first, best


def tweak_final_norm(x_q: torch.Tensor, x: torch.Tensor, g0: torch.Tensor, head: torch.Tensor,
                     head_q: torch.Tensor, cfg, steps: int = STEPS, lr: float = LR,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """x_q, x: ``[S, L, H]`` the quantized and the unquantized model's residual streams before the
    final norm; g0: the final norm's weight (as the forward uses it); head, head_q: the head's
    weight ``[V, H]`` unquantized and decoded; bias: the final norm's (LayerNorm), kept as it is.
    Returns the weight that minimizes the mean
    KL(unquantized || quantized) of the next-token distributions, float16-exact as stored, and
    that KL (nats per token) before and after."""
    xq = x_q.reshape(-1, x_q.shape[-1])
    xf = x.reshape(-1, x.shape[-1])
    n = xq.shape[0]
    span = head_span(n)
    spans = range(0, n, span)

    def logp(h: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with module_matmuls(h.device):
            return forward.log_probs(h, g, weight, cfg, bias)

    def loss_of(g: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=g.device)
        for t in spans:
            # recomputed every step: kept, the reference log-probabilities would take tokens x vocab
            # floats (6.4 GB for SmolLM2's 16 rows)
            with torch.no_grad():
                ref = logp(xf[t:t + span], g0, head)
            kl = (ref.exp() * (ref - logp(xq[t:t + span], g, head_q))).sum() / n
            with grad_pass(xq.device):
                kl.backward()
            total += kl.detach().double()
        return total

    g, first, best = _fit(loss_of, g0.detach(), steps, lr)
    return as_stored(g, cfg.norm_offset), first, best


def save_norm(save, name: str, weight: torch.Tensor, cfg) -> None:
    """A tweaked norm ``name``'s weight (as the forward uses it) through ``save`` (the
    quantization pass's writer of a module's tensors), in the dtype and convention the compile
    writes (:func:`stored`)."""
    save(name.removesuffix(".weight"), {"weight": stored(weight, cfg.norm_offset).cpu()})
