"""Modules the runtime puts where a transformers class holds one tensor for what the EXL2 files
store as several quantized linears (exl2conv.runtime.architectures)."""

from __future__ import annotations

import torch


class FusedExl2Linear(torch.nn.Module):
    """A fused linear of the class (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn, DBRX's
    Wqkv) from the EXL2 parts it was split into: ``y = cat(part_0(x), part_1(x), ...)`` along the
    last dimension, the fused weight's rows in the parts' order (exl2conv.model.arch._fused_rows;
    a contiguous split, which every fused linear the runtime loads is)."""

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class Exl2Experts(torch.nn.ModuleList):
    """A mixture of experts' expert linears, one module each, in place of the class's experts
    module (transformers 5 holds them as 3D parameters): the same call,
    ``(hidden_states [..., H], top_k_index [T, k], top_k_weights [T, k]) -> [..., H]`` with T the
    tokens, computing for each token the sum over its k experts j of
    ``weight * down_j(act(gate_j(x)) * up_j(x))``, in transformers' order of operations (products
    by the routing weights in their dtype, then cast, then added expert by expert).

    Item ``j`` is expert j's linears by name, ``names`` = (gate, up, down) being the EXL2 files'
    short names (Mixtral's w1, w3, w2): ``<experts>.<j>.<name>`` is the module of the file's linear."""

    def __init__(self, linears: list[dict[str, torch.nn.Module]], names: tuple[str, str, str], act):
        super().__init__(torch.nn.ModuleDict(d) for d in linears)
        self.names, self.act = names, act

    def forward(self, hidden_states, top_k_index, top_k_weights):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        gate, up, down = self.names
        for j, expert in enumerate(self):
            token, slot = torch.where(top_k_index == j)
            if token.numel() == 0:
                continue
            h = x[token]
            h = expert[down](self.act(expert[gate](h)) * expert[up](h))
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out.view(hidden_states.shape)
