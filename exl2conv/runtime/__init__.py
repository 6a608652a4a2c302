"""Running EXL2 models without ExLlamaV2 (issue 30): :class:`Exl2Linear` keeps a linear packed and
dequantizes it on the fly (CUDA kernels on a GPU, torch elsewhere); :class:`Exl2ForCausalLM` loads an
EXL2 folder as a transformers model."""

from exl2conv.runtime.linear import Exl2Linear
from exl2conv.runtime.model import SUPPORTED, Exl2ForCausalLM

__all__ = ["SUPPORTED", "Exl2ForCausalLM", "Exl2Linear"]
