"""The model side of the converter: config.json, the architecture table (HF tensor names and
shapes), a lazy safetensors index and a float32 module-by-module forward pass."""

from .arch import (ARCHS, ArchSpec, LinearSpec, expected_tensors, head_spec, layer_linears,
                   unquantized_tensors)
from .config import ModelConfig, load_config
from .weights import WeightIndex

__all__ = [
    "ARCHS", "ArchSpec", "LinearSpec", "ModelConfig", "WeightIndex", "expected_tensors",
    "head_spec", "layer_linears", "load_config", "unquantized_tensors",
]
