"""The attention of the passes that backpropagate through it (the sensitivity stage, norm
tweaking): causal attention on CUDA in float16 through PyTorch's flash kernels with a
deterministic backward, or in float32 a block of queries at a time; :func:`grad_attention`
chooses for a block of code, and :func:`exl2conv.model.forward.attention` asks :func:`grad_mode`.
Both compute what the math kernels compute, with the same bits on every run."""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Set by :func:`grad_attention`: how plain causal attention on CUDA runs ("half", "blocked"; any
# other value: PyTorch's kernels).
_GRAD_ATTENTION = contextvars.ContextVar("exl2conv_grad_attention", default=None)


@contextmanager
def grad_attention(mode: str | None):
    """Within this block, plain causal attention on CUDA (no window, no softcap) runs

    - with ``"half"``: on float16 q/k/v through PyTorch's flash kernels, as ExLlamaV2's runtime
      runs it, its backward on the flash kernels' deterministic variant (:class:`HalfAttention`);
      an option for the passes that backpropagate through attention (layers.grad_pass);
    - with ``"blocked"``, where autograd records it: on :class:`BlockedAttention`, float32 like
      the math kernels and as deterministic, about half their work and memory (it holds the causal
      half of the scores; the float16 path is about 3x faster);
    - otherwise on PyTorch's kernels."""
    token = _GRAD_ATTENTION.set(mode)
    try:
        yield
    finally:
        _GRAD_ATTENTION.reset(token)


class HalfAttention(torch.autograd.Function):
    """Causal attention of float32 q/k/v ``[B, heads, L, d]`` computed in float16; the backward
    scales the incoming gradient by a power of two into float16's range and back, and runs with
    torch's deterministic algorithms on, under which the flash backward adds its partial sums in a
    fixed order."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        with torch.enable_grad():
            leaves = [t.detach().half().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
        ctx.graph = (leaves, out)
        return out.detach().float()

    @staticmethod
    def backward(ctx, grad):
        leaves, out = ctx.graph
        ctx.graph = None
        # a power of two: exact in both directions
        s = torch.exp2(torch.ceil(torch.log2(grad.abs().amax().clamp_min(1e-30))))
        prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            grads = torch.autograd.grad(out, leaves, (grad / s).half())
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=warn)
        return grads[0].float() * s, grads[1].float() * s, grads[2].float() * s, None


BLOCK = 512  # query rows per block of :class:`BlockedAttention`


class BlockedAttention(torch.autograd.Function):
    """Causal attention of float32 q/k/v ``[B, heads, L, d]``, :data:`BLOCK` query rows at a time,
    each block against only the keys it can see (the math kernels compute and mask all L x L
    scores). Keeps each block's probabilities for the backward, which computes
    ``dS = P (dP - rowsum(dO O))`` and adds the blocks' key and value gradients one after another
    in a fixed order: no atomics, the same bits every run (matmuls through cuBLAS, deterministic
    under CUBLAS_WORKSPACE_CONFIG)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        length = q.shape[-2]
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        q = q * scale  # scaled once here rather than every block's scores
        out = torch.empty_like(q)
        probs = []
        for a in range(0, length, BLOCK):
            b = min(length, a + BLOCK)
            s = torch.matmul(q[:, :, a:b], k[:, :, :b].transpose(-1, -2))
            hidden = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu_(1)
            s[..., a:b].masked_fill_(hidden, float("-inf"))
            p = torch.softmax(s, dim=-1)
            del s
            out[:, :, a:b] = torch.matmul(p, v[:, :, :b])
            probs.append(p)
        ctx.save_for_backward(q, k, v, out)
        ctx.probs, ctx.scale = probs, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out = ctx.saved_tensors
        probs, scale = ctx.probs, ctx.scale
        if probs is None:
            raise RuntimeError("BlockedAttention: a second backward through the same graph (its "
                               "probabilities are freed as the first one runs)")
        ctx.probs = None
        grad = grad.contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        rowdot = (grad * out).sum(-1, keepdim=True)
        for i, a in enumerate(range(0, q.shape[-2], BLOCK)):
            b = min(q.shape[-2], a + BLOCK)
            p, probs[i] = probs[i], None
            g = grad[:, :, a:b]
            dv[:, :, :b] += torch.matmul(p.transpose(-1, -2), g)
            ds = torch.matmul(g, v[:, :, :b].transpose(-1, -2))
            ds.sub_(rowdot[:, :, a:b]).mul_(p)
            del p
            dq[:, :, a:b] = torch.matmul(ds, k[:, :, :b])
            dk[:, :, :b] += torch.matmul(ds.transpose(-1, -2), q[:, :, a:b])  # q saved scaled
        return dq.mul_(scale), dk, dv, None


def grad_mode() -> str | None:
    """The mode :func:`grad_attention` set for the running code: "half", "blocked", or None."""
    return _GRAD_ATTENTION.get()
