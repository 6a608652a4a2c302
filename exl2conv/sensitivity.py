"""What an error in each module's output costs at the model's output: a diagonal Fisher estimate.

An error ``e`` added to the residual stream right after module i changes the model's next-token
distributions, to second order, by

    sum_t KL(p_t || p_t(e))  ~  1/2 e^T F_i e

where ``F_i`` is the Fisher information of those distributions with respect to that residual
stream. Its diagonal, averaged over the calibration tokens, gives one weight per hidden channel:
``F_i[c] = mean_t g[t, c]^2``, with ``g`` the gradient of ``-sum_t log p_t(y_t)`` for tokens
``y_t`` drawn from the model's own distributions. One draw per position is an unbiased estimate:
the scores of different positions are independent with mean zero, so their cross terms vanish in
expectation, and ``E[g g^T]`` is the Fisher matrix itself.

The measurement scores every candidate by ``1/2 mean_t sum_c F_i[c] e[t, c]^2`` (predicted KL,
nats per token, see :func:`metrics.relative_errors`), and the solver adds these predictions over
modules: a single objective in the units the user cares about, which weighs a module by how much
its errors reach the output instead of by a proxy. The cross terms that the diagonal leaves out
(between channels and between positions) are what the measured error cannot carry anyway.

Cost: one forward and one backward of the unquantized model over a few thousand calibration
tokens (and the attention's forward once more, so that the backward holds one module's graph at
a time), one layer's weights at a time (on a GPU the backward's matmuls run in TF32 like the
forward's, see :func:`layers.module_matmuls`): a small fraction of the measurement.
"""

from __future__ import annotations

import torch

from exl2conv import stop
from exl2conv.layers import block_forward, grad_pass
from exl2conv.model import forward
from exl2conv.model.arch import embedding_tensor

TOKENS = 8192                # calibration tokens the estimate uses at most
SAMPLE_BYTES = 64 << 20      # float64 cumulative sums made at a time by sample()
STORE_BYTES = 4 << 30        # layer inputs kept for the backward pass, at most
HEAD_TOKENS = 512            # positions per head forward (bounds the [T, vocab] logits)
SEED = 0


def rows_for(ids: torch.Tensor, hidden: int, layers: int) -> int:
    """How many calibration rows the estimate uses: at most :data:`TOKENS` tokens and
    :data:`STORE_BYTES` of stored float32 layer inputs, at least one row."""
    rows, length = ids.shape
    by_tokens = TOKENS // length
    by_bytes = STORE_BYTES // (length * hidden * 4 * max(1, layers))
    return max(1, min(rows, by_tokens, by_bytes))


STORE_GPU_BYTES = 256 << 20  # layer inputs kept on the GPU, at most (else in host memory)


def _store_device(device: torch.device, nbytes: int) -> torch.device:
    """The layer inputs stay on the accelerator when they take at most :data:`STORE_GPU_BYTES`
    and a quarter of its free memory. A 32-layer Llama-2-7B stores 4 GiB (4 rows of 2048 tokens
    per layer): on the GPU they were the whole job's peak (6.0 GiB, against 3.2 GiB for the
    rest), and a 4-layer one's 0.5 GiB made this stage's peak (2.5 GiB) the measurement job's;
    each is read back once, so host memory costs little."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= min(STORE_GPU_BYTES, free // 4):
            return device
    return torch.device("cpu")


def sample(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per position drawn from ``exp(logp)`` ``[T, V]`` -> int64 ``[T, 1]``, by inverting
    each position's cumulative distribution at one uniform number. The uniforms come from ``gen``,
    a CPU generator, whatever device ``logp`` is on, so that a GPU and a CPU draw the same tokens
    and the two paths' Fisher estimates, and the predicted KL the solver minimizes, differ only by
    their arithmetic. (A draw from a generator on the compute device differs between CUDA and the
    CPU: SmolLM2's per-module predicted KL then differed by 2 % (median), docs/performance.md.)

    The cumulative sums are float64: in float32 a sum over a large vocabulary carries rounding
    errors of about 1e-5 of the mass that depend on the order of the additions, which differs
    between devices (CUDA's parallel scan, the CPU's running sum), and on a 49152-token vocabulary
    0.34 % of the draws fell on another token between an H100 and a CPU. In float64 such a split
    needs a uniform within about 1e-12 of a boundary. torch.multinomial took seconds on a GPU for a
    large vocabulary."""
    if gen.device.type != "cpu":
        raise ValueError("sample() takes a CPU generator, so that every device draws the same tokens")
    u = torch.rand(logp.shape[0], 1, generator=gen, dtype=torch.float64).to(logp.device)
    out = torch.empty(logp.shape[0], 1, dtype=torch.int64, device=logp.device)
    step = max(1, SAMPLE_BYTES // (8 * logp.shape[-1]))
    for t0 in range(0, logp.shape[0], step):
        cdf = logp[t0:t0 + step].detach().double().exp().cumsum(-1)
        # the first token whose cumulative probability exceeds u (of the row's total, which
        # rounding leaves a little off 1): tokens of zero probability are never drawn
        out[t0:t0 + step] = torch.searchsorted(cdf, u[t0:t0 + step] * cdf[:, -1:], right=True)
    return out.clamp_(max=logp.shape[-1] - 1)


def head_gradient(x: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, cfg, gen: torch.Generator,
                  norm_b: torch.Tensor | None = None) -> torch.Tensor:
    """x f32 [L, H] (the residual stream after the last layer) -> d/dx of ``-sum_t log p_t(y_t)``
    [L, H], each ``y_t`` drawn from ``p_t`` with ``gen``. Positions go :data:`HEAD_TOKENS` at a
    time: each position's logits depend on that position alone."""
    grads = []
    for t0 in range(0, x.shape[0], HEAD_TOKENS):
        stop.check()
        xs = x[t0:t0 + HEAD_TOKENS].detach().requires_grad_(True)
        with torch.enable_grad():
            logp = forward.log_probs(xs, norm_w, head_w, cfg, norm_b)
            (-logp.gather(-1, sample(logp.detach(), gen)).sum()).backward()
        grads.append(xs.grad)
    return torch.cat(grads)


def fisher_diagonals(weights, cfg, ids: torch.Tensor, device: torch.device, on_layer=None,
                     check=None, chunk: int | None = None) -> torch.Tensor:
    """ids: int64 ``[R, L]`` calibration rows (the first :func:`rows_for` are used). Returns float32
    ``[2 * layers, H]`` on the CPU: row ``2i`` is the Fisher diagonal of the residual stream after
    layer i's attention, row ``2i + 1`` after its MLP (in module order, module index - 1); a
    parallel block (Cohere) has no stream between its branches: both rows are its output's.
    on_layer(): called once per layer in each of the two passes (for a progress bar);
    check(m, x): called with each module's forward output ``x`` (m as the rows above), to refuse
    non-finite states before the backward pass spreads them; chunk: rows per forward call (all at
    once when None; a 7B MLP's intermediates over 4 rows of 2048 tokens are 0.34 GiB each)."""
    layers, hidden = cfg.num_layers, cfg.hidden_size
    ids = ids[: rows_for(ids, hidden, layers)]
    rows, length = ids.shape
    store = _store_device(device, rows * length * hidden * 4 * layers)
    rope = forward.RotaryCache(cfg)
    gen = torch.Generator().manual_seed(SEED)  # on the CPU for every device: see sample()

    def load(i: int, part: str, ahead: list[str] | None = None) -> dict:
        return forward.load_layer_weights(weights, cfg, i, part, device, ahead=ahead)

    inputs, x = _forward(weights, cfg, ids, device, store, rope, chunk or rows, on_layer, check)
    norm_w, norm_b = forward.load_final_norm(weights, cfg, device)
    head_w = forward.load_head(weights, cfg, device)
    grad = torch.stack([head_gradient(x[r], norm_w, head_w, cfg, gen, norm_b) for r in range(rows)])
    del x, head_w

    fisher = torch.zeros(2 * layers, hidden, dtype=torch.float32, device=device)
    parts = forward.layer_parts(cfg)
    for i in reversed(range(layers)):
        below = [t for part in parts for t in forward.module_tensors(weights, cfg, i - 1, part)] if i else []
        if parts == ("parallel",):
            _parallel_backward(i, load(i, "parallel", ahead=below), inputs, grad, fisher, cfg, rope)
            inputs[i] = None
            if on_layer:
                on_layer()
            continue
        w_attn, w_mlp = load(i, "attn"), load(i, "mlp", ahead=below)  # backwards: the layer below next
        for r in range(rows):
            stop.check()  # a row's backward through a layer is the stage's unit of work
            g = grad[r:r + 1]
            fisher[2 * i + 1] += g.square().sum((0, 1))
            xin = inputs[i][r:r + 1].to(device).requires_grad_(True)
            # one module's graph at a time: the attention's output first, its graph dropped at
            # once, then made again once the MLP's is gone (one more attention forward; both
            # graphs at once made this stage the measurement job's peak, 2.0 GiB on a Llama-2-7B).
            # The first forward runs as the second does, with a graph: the same kernels, the same bits.
            with torch.enable_grad(), grad_pass(xin.device):
                mid = block_forward("attn", xin, w_attn, cfg, rope, layer=i)[0].detach().requires_grad_(True)
                out, _ = block_forward("mlp", mid, w_mlp, cfg, rope, layer=i)
                # scalar losses with the same gradients as out.backward(g): a tensor argument makes
                # torch import its symbolic-shapes machinery (and SymPy) into every conversion
                (out * g).sum().backward()
                g_mid = mid.grad
                del out, mid
                fisher[2 * i] += g_mid.square().sum((0, 1))
                mid, _ = block_forward("attn", xin, w_attn, cfg, rope, layer=i)
                (mid * g_mid).sum().backward()
                del mid, g_mid
            grad[r:r + 1] = xin.grad
        inputs[i] = None
        if on_layer:
            on_layer()
    return (fisher / (rows * length)).cpu()


def _forward(weights, cfg, ids: torch.Tensor, device: torch.device, store: torch.device, rope, step: int,
             on_layer=None, check=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The unquantized model's forward over ``ids``, ``step`` rows per call: each layer's input
    (kept on ``store`` for the backward) and the residual stream after the last layer."""
    rows = ids.shape[0]
    x = forward.embed(ids.to(device), weights.get(embedding_tensor(cfg), device=device), cfg.embed_scale,
                      forward.load_positions(weights, cfg, device))
    inputs = []
    with torch.no_grad():
        for i in range(cfg.num_layers):
            inputs.append(x.to(store, non_blocking=True))  # no host sync where it leaves the GPU
            for part in forward.layer_parts(cfg):
                stop.check()
                w = forward.load_layer_weights(weights, cfg, i, part, device)
                if step >= rows:
                    x, _ = block_forward(part, x, w, cfg, rope, layer=i)
                else:  # a new tensor: x may be the stored input itself
                    x = torch.cat([block_forward(part, x[r0:r0 + step], w, cfg, rope, layer=i)[0]
                                   for r0 in range(0, rows, step)])
                del w
                if check:
                    check(2 * i + (part != "attn"), x)
            if on_layer:
                on_layer()
    return inputs, x


def _parallel_backward(i: int, w: dict, inputs: list, grad: torch.Tensor, fisher: torch.Tensor, cfg, rope) -> None:
    """:func:`fisher_diagonals`' backward through parallel block ``i``: its output's Fisher into
    both of the layer's rows, and ``grad`` (row by row) replaced by the gradient at its input."""
    for r in range(grad.shape[0]):
        stop.check()
        g = grad[r:r + 1]
        sq = g.square().sum((0, 1))
        fisher[2 * i] += sq
        fisher[2 * i + 1] += sq
        xin = inputs[i][r:r + 1].to(g.device).requires_grad_(True)
        with torch.enable_grad(), grad_pass(xin.device):
            out, _ = block_forward("parallel", xin, w, cfg, rope, layer=i)
            (out * g).sum().backward()
            del out
        grad[r:r + 1] = xin.grad


def predicted_kl(cost_sums: torch.Tensor, tokens: int) -> float:
    """Predicted KL (nats per token) from per-row sums of ``F[c] e[t, c]^2`` (float64 ``[R]``)."""
    return 0.5 * float(cost_sums.sum()) / max(1, tokens)
