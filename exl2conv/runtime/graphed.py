"""Batch-1 decoding with a static KV cache, each one-token step replayed as a CUDA graph.

A decode step of a transformers model is hundreds of small launches issued from Python (norms,
rotary embedding, attention, the quantized linears): at one token the GPU mostly waits for the
host. Capturing the step once and replaying it takes the host out of the loop. Capture needs fixed
addresses and no host synchronisation inside the step, so:

* the KV cache is transformers' StaticCache (allocated once, written in place at each position);
* the step's inputs (token, position) are copied into tensors that live as long as the graph;
* the attention mask is handed to the model as a 4D additive mask over the whole cache, kept here
  and opened one position per step, so transformers builds none (its mask code may synchronise);
* the quantized linears' kernels allocate only from torch's caching allocator (csrc/exl2_linear.cu).

Models whose step depends on values (a mixture of experts routes tokens by value) or whose layers
keep caches of different lengths (sliding windows) are not captured: :func:`capturable` says which,
and :class:`StaticDecoder` then runs the same static-cache step eagerly. On the CPU the step always
runs eagerly, which is what the tests check the cache, positions and mask with.
"""

from __future__ import annotations

import inspect
import warnings

import torch


def capturable(model) -> str | None:
    """None when a decode step of ``model`` can be captured as a CUDA graph, else the reason."""
    from exl2conv.runtime.modules import Exl2Experts

    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(isinstance(m, Exl2Experts) for m in model.modules()):
        return "its experts are chosen per token by value"
    if getattr(cfg, "vision_config", None) is not None:
        return "a vision-language model places its tokens by more than one position each"
    if getattr(text, "sliding_window", None) or "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "its sliding-window layers keep caches of another length"
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) in ("dynamic", "longrope"):
        return "its rotary embedding is chosen by the sequence's length on the host"
    return None


def _cache_keyword(model) -> str:
    # transformers 5.25 renamed the forward's past_key_values to cache (the old name warns)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Greedy batch-1 decoding of a transformers causal LM (an Exl2ForCausalLM) into a static cache
    of ``max_len`` positions: :meth:`prefill` the prompt, then :meth:`step` one token at a time.

    ``graph``: replay each step as a CUDA graph (default: on CUDA when :func:`capturable`). The
    graph is captured at the first step, after two eager warm-up runs of that same step (they write
    the same keys and values at the same position once the cache's counters are put back, so
    running it again changes nothing).
    """

    def __init__(self, model, max_len: int, graph: bool | None = None):
        from exl2conv.runtime.model import _transformers

        self.model, self.max_len = model, max_len
        self.device = model.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.cache = _transformers().StaticCache(config=model.config, max_cache_len=max_len)
        self.cache_kw = _cache_keyword(model)
        self.length = 0
        # the 1-token step's inputs and outputs, at fixed addresses for the graph
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        self.mask = torch.full((1, 1, 1, max_len), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        self.logits: torch.Tensor | None = None
        reason = capturable(model)
        if graph is None:
            graph = self.device.type == "cuda" and reason is None
        if graph and (self.device.type != "cuda" or reason is not None):
            raise ValueError(f"a CUDA graph of this model's step is not possible: "
                             f"{reason or 'the model is not on a CUDA device'}")
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos.unsqueeze(0), cache_position=pos, attention_mask=mask,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] of the last prompt token; ``ids`` [1, n] goes into the cache from
        position 0 (the cache is reset)."""
        n = ids.shape[1]
        if ids.shape[0] != 1 or not 1 <= n < self.max_len:
            raise ValueError(f"prefill takes one row of 1 to {self.max_len - 1} tokens, got {tuple(ids.shape)}")
        self.cache.reset()
        self.mask.fill_(torch.finfo(self.dtype).min)
        self.mask[..., :n] = 0
        pos = torch.arange(n, device=self.device)
        causal = torch.full((n, self.max_len), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        causal[:, :n] = torch.triu(causal[:, :n], diagonal=1)  # row i sees keys 0..i
        self.length = n
        return self._forward(ids.to(self.device), pos, causal[None, None])

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] after appending ``token`` (a [1, 1] or [1] tensor on any device). The
        returned tensor is overwritten by the next step on the graph path: copy it to keep it."""
        if self.length == 0:
            raise ValueError("step before prefill: the cache holds no prompt")
        if self.length >= self.max_len:
            raise ValueError(f"the static cache is full ({self.max_len} positions)")
        self.ids.copy_(token.reshape(1, 1))
        self.pos.fill_(self.length)
        self.mask[..., self.length] = 0
        if not self.use_graph:
            logits = self._forward(self.ids, self.pos, self.mask)
        elif self.graph is None and not self._capture():
            logits = self._forward(self.ids, self.pos, self.mask)
        else:
            self.graph.replay()
            logits = self.logits
        self.length += 1
        return logits

    def _counters(self) -> list[tuple[object, str, object]]:
        """The cache layers' own position counters (transformers 5's StaticLayer writes at its
        ``cumulative_length``, a device tensor it advances in place, not at ``cache_position``):
        (layer, attribute, a copy of its value)."""
        saved = []
        for layer in getattr(self.cache, "layers", ()):
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                    saved.append((layer, name, value.clone()))
                elif isinstance(value, int) and not isinstance(value, bool) and "length" in name:
                    saved.append((layer, name, value))
        return saved

    def _warm_up(self, runs: int = 2) -> None:
        """Run the current step ``runs`` times eagerly (kernels built and loaded, cuBLAS
        workspaces, allocator pools), then put the cache's counters back: each run advanced them,
        and the step that follows must write where this one does."""
        saved = self._counters()
        for _ in range(runs):
            self._forward(self.ids, self.pos, self.mask)
        for layer, name, value in saved:
            if isinstance(value, torch.Tensor):
                getattr(layer, name).copy_(value)
            else:
                setattr(layer, name, value)

    def _capture(self) -> bool:
        """Capture the step at the current position; False (and eager steps from then on) when
        something in the model's step cannot be captured: the step is still right, only slower."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._warm_up()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._forward(self.ids, self.pos, self.mask)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warnings.warn(f"decoding without a CUDA graph: this model's step could not be captured ({first})")
            self.use_graph, self.logits = False, None
            return False
        self.graph = graph
        return True

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, new_tokens: int, eos: set[int] | None = None, on_token=None) -> list[int]:
        """The greedy continuation of ``ids`` [1, n]: up to ``new_tokens`` token ids, stopping after
        one in ``eos``; ``on_token(id)`` is called with each as it comes."""
        logits = self.prefill(ids)
        out: list[int] = []
        for i in range(new_tokens):
            nxt = logits.argmax(-1)
            tok = int(nxt)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if (eos and tok in eos) or i == new_tokens - 1:
                break
            logits = self.step(nxt)
        return out
