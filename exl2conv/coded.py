"""The measurement's candidates stored as their codes (:class:`Coded`), a quarter of their float32
size, decoded on demand with the runtime's float16 arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from exl2conv import ops
from exl2conv.gptq import QuantResult
from exl2conv.memory import HostArena, device_constant, pinned_copy
from exl2conv.pack import dequant_scale, qzero


@dataclass
class Coded:
    """A quantized weight kept as its codes, a quarter of its float32 size: ``decode`` gives
    the dequantized weight bit for bit (the runtime's float16 arithmetic).

    codes: uint8 ``[K, N]`` (permuted rows); zero: int16 ``[K]``, each row's 2^(bits-1);
    scale: float16 ``[G, N]``, each group's effective scale; group: int64 ``[K]``, each row's group;
    invperm: int64 ``[K]``; out_features: the unpadded N."""

    codes: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor
    group: torch.Tensor
    invperm: torch.Tensor
    out_features: int

    @classmethod
    def of(cls, res: QuantResult, out_features: int, invperm: torch.Tensor) -> "Coded":
        """From a result with or without codes (the codes are recovered from the dequantized
        values): each is ``fp16(c * s)`` for an integer ``|c| <= 128`` and the row's float16 scale
        ``s``, so ``q / s`` lies within ``128 * 2^-11`` of ``c`` and rounds back to it exactly (a
        zero scale, whose values are all zero, keeps the zero point)."""
        dev = res.q.device

        def make():
            rows = torch.tensor([g.rows for g in res.groups])
            zero = torch.tensor([qzero(g.bits) for g in res.groups], dtype=torch.int16)
            return (torch.repeat_interleave(torch.arange(len(res.groups)), rows).to(dev),
                    torch.repeat_interleave(zero, rows).to(dev))
        group, zero = device_constant(("coded", tuple((g.rows, g.bits) for g in res.groups)), dev, make)
        scale = dequant_scale(res.qs, res.qscale_max)
        codes = torch.empty(res.q.shape, dtype=torch.uint8, device=dev)
        ops.codes_of(res.q, scale, group, zero, codes)
        return cls(codes=codes, zero=zero, scale=scale, group=group, invperm=invperm, out_features=out_features)

    def payload(self) -> list:
        """The weight's tensors where they are and its size, to send to another rank
        (:meth:`World.share`; :meth:`from_payload` makes the weight again)."""
        return [self.codes, self.zero, self.scale, self.group, self.invperm, self.out_features]

    @classmethod
    def from_payload(cls, payload: Sequence, device: torch.device, host_codes: bool = False,
                     arena: HostArena | None = None) -> "Coded":
        """A weight another rank sent (:meth:`payload`), where this rank's own would be: on
        ``device``, with ``host_codes`` its codes in (pinned) host memory as :meth:`to_host` puts
        them (codes that came in host memory go there directly, not through the GPU)."""
        codes, zero, scale, group, invperm, out_features = payload
        if host_codes and codes.device.type == "cpu":
            codes = arena.copy_of(codes) if arena is not None else pinned_copy(codes, non_blocking=False)
        else:
            codes = codes.to(device)
        made = cls(codes=codes, zero=zero.to(device), scale=scale.to(device), group=group.to(device),
                   invperm=invperm.to(device), out_features=out_features)
        return made.to_host(arena) if host_codes else made

    def to_host(self, arena: HostArena | None = None) -> "Coded":
        """The same weight with its codes moved to pinned host memory (where there is a GPU;
        into ``arena`` when given): the small tensors stay, and :meth:`decode` copies the codes
        back in."""
        if self.codes.device.type == "cpu":
            return self
        codes = arena.copy_of(self.codes) if arena is not None else pinned_copy(self.codes, non_blocking=False)
        return Coded(codes=codes, zero=self.zero, scale=self.scale, group=self.group, invperm=self.invperm,
                     out_features=self.out_features)

    def delta(self, base: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """``bfloat16(decode() - base)`` with the strides of that expression's result (``[out, K]``,
        column-major): what the measurement's corrected forwards take for each candidate, once per
        chunk of rows (:func:`exl2conv.ops.coded_delta`: one kernel on a GPU). base: ``[out, K]``,
        on the device of the scales; codes: as for :meth:`decode`."""
        if codes is None:
            codes = self.codes.to(self.scale.device, non_blocking=True)
        return ops.coded_delta(codes, self.zero, self.scale, self.group, self.invperm, base)

    def decode(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """float16 ``[out_features, K]``: the weight in the HF orientation and original row order,
        on the device of the scales. codes: this weight's codes already there (see
        :meth:`to_host`); by default copied from wherever they are."""
        if codes is None:
            codes = self.codes.to(self.scale.device, non_blocking=True)
        return ops.decode_coded(codes, self.zero, self.scale, self.group, self.invperm, self.out_features)
