"""exl2conv: convert Hugging Face models to ExLlamaV2's EXL2 format.

Nothing runs at import time: the command line lives in :mod:`exl2conv.cli`.
"""

__version__ = "0.1.0"

# The EXL2 format version written into quantization_config; ExLlamaV2 0.3.2 writes its
# own package version there and its loader never reads it.
EXL2_FORMAT_VERSION = "0.3.2"
