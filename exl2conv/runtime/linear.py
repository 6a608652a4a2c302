"""Exl2Linear: an EXL2 quantized linear that keeps its packed tensors and dequantizes on the fly.

On a GPU with the CUDA extension and float16 activations, the kernels read the packed tensors
directly (csrc/exl2_linear.cu, through :mod:`exl2conv.ops`): up to 8 rows (decoding) go through
the fused dequantize + matrix-vector kernel ``exl2_gemv``; more rows (prefill) through
``exl2_dequant`` (the fp16 weight, built per call and not kept) and a cuBLAS matmul. Everywhere
else the torch path runs: :func:`exl2conv.pack.decode_linear` (the fp16 weight ExLlamaV2's
reconstruct builds, bit for bit, which ``exl2_dequant`` equals) and a matmul.
"""

from __future__ import annotations

import torch

from exl2conv import ops
from exl2conv.pack import QUANT_KEYS, check_linear, chunk_map, q_perm


class Exl2Linear(torch.nn.Module):
    """``y = x @ W^T + b`` with W held as EXL2 tensors (docs/format.md).

    Buffers: q_weight, q_scale, q_scale_max, q_groups, q_invperm and, where the linear has one,
    bias (fp16, already in the model's own column order: a dense MLP's gate/up bias is reordered
    from the file's runtime order by the loader, :func:`exl2conv.runtime.model.load_linears`).
    ``in_features``/``out_features`` are the model's; the packed width N may be padded past
    out_features to a multiple of 32, and the padding columns are dropped after decoding.

    ``cache``: keep the decoded fp16 weight after the first forward (as much memory as an FP16
    model, decoding once); off by default, so that the weights stay packed as the file holds them.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, name: str = "",
                 cache: bool = False):
        super().__init__()
        info = check_linear(tensors, name)  # refuses inconsistent tensors once, at load
        if out_features > info.n:
            raise ValueError(f"{name}: out_features {out_features} exceeds the packed width {info.n}")
        self.name = name
        self.in_features, self.out_features = info.k, out_features
        for key in QUANT_KEYS:
            self.register_buffer(key, tensors[key].contiguous())
        # what the kernels derive at load (ExLlamaV2 derives its q_perm and q_group_map so too);
        # not saved with the module: the file's tensors define it
        self.register_buffer("q_perm", q_perm(tensors["q_invperm"]), persistent=False)
        self.register_buffer("q_map", chunk_map(info.groups), persistent=False)
        bias = tensors.get("bias")
        self.register_buffer("bias", None if bias is None else bias[:out_features].contiguous())
        self.cache = cache
        self._decoded: torch.Tensor | None = None
        self._args: tuple[torch.Tensor, ...] | None = None

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed tensors and the derived q_perm and q_map, as :mod:`exl2conv.ops`' EXL2
        operations take them."""
        tensors = {k: getattr(self, k) for k in QUANT_KEYS + ("q_perm", "q_map")}
        # model.float() / .to(dtype) casts every floating buffer; the fp16 scale maxima survive the
        # round trip exactly, and the decoder reads them as the file stores them
        tensors["q_scale_max"] = tensors["q_scale_max"].to(torch.float16)
        return tensors

    def decoded(self) -> torch.Tensor:
        """fp16 Wt [in_features, out_features] in the model's row and column order (the dequantize
        kernel on a GPU, the torch decoder elsewhere: the same bits)."""
        if self._decoded is not None:
            return self._decoded
        wt = ops.exl2_dequant(self.packed())[:, :self.out_features]
        if self.cache:
            self._decoded = wt
        return wt

    def kernel_args(self) -> tuple[torch.Tensor, ...]:
        """The packed tensors as the kernels take them (:func:`exl2conv.ops.kernel_args`), made once:
        a decode step calls hundreds of linears, and their host-side cost is the step's."""
        args = self._args
        # made again when a buffer was replaced (loaders may assign buffers without a hook)
        if args is None or args[0] is not self.q_weight or args[1] is not self.q_scale or args[3] is not self.q_perm:
            args = self._args = ops.kernel_args(self.packed())
        return args

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() move the buffers; a cached decode or argument tuple on the old device is
        # dropped, not moved
        self._decoded = self._args = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernels are looked up once per call (each lookup reads the settings)
        dequant = ops.kernel("exl2_dequant", x) if not self.cache and x.dtype == torch.float16 else None
        if dequant is not None:
            return self._forward_kernels(x, dequant)
        wt = self.decoded()
        # Half products on the CPU round as they go; float32 there (exact widening of the fp16
        # weight), rounded to the input's dtype once at the end. On CUDA, cuBLAS accumulates half
        # products in float32 itself.
        acc = torch.float32 if x.device.type == "cpu" or x.dtype == torch.float32 else x.dtype
        y = torch.matmul(x.to(acc), wt.to(acc))
        if self.bias is not None:
            y = y + self.bias.to(acc)
        return y.to(x.dtype)

    def _forward_kernels(self, x: torch.Tensor, dequant) -> torch.Tensor:
        """The CUDA path: exl2_gemv for up to 8 rows, else exl2_dequant and a cuBLAS matmul (which
        accumulates half products in float32)."""
        rows = x.reshape(-1, self.in_features)
        args = self.kernel_args()
        gemv = ops.kernel("exl2_gemv", x) if 1 <= rows.shape[0] <= ops.GEMV_ROWS else None
        if gemv is not None:
            y = gemv(rows.contiguous(), *args)[:, :self.out_features]
        else:
            y = torch.matmul(rows, dequant(*args)[:, :self.out_features])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bits = self.q_groups[0::2].tolist()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={sorted(set(bits), reverse=True)}, bias={self.bias is not None}")
