"""exl2conv: convert Hugging Face models to ExLlamaV2's EXL2 format.

Nothing runs at import time and nothing heavy is imported: the command line lives in
:mod:`exl2conv.cli`, the conversion job in :mod:`exl2conv.pipeline`, and the Python API
(``exl2conv.convert(...)``, ``exl2conv.Exl2Quantizer``) is loaded from :mod:`exl2conv.api` on
first use, and the runtime (``exl2conv.Exl2ForCausalLM``) from :mod:`exl2conv.runtime`. The one thing done at import: the
``exl2`` quantization method is registered with transformers when transformers' quantizers load
(:mod:`exl2conv.hf_hook`, standard library only), so that ``AutoModelForCausalLM.from_pretrained``
loads EXL2 folders.
"""

from exl2conv import hf_hook

__version__ = "0.2.0"

# The EXL2 format version written into quantization_config; ExLlamaV2 0.3.2 writes its
# own package version there and its loader never reads it.
EXL2_FORMAT_VERSION = "0.3.2"

__all__ = ["convert", "Exl2ForCausalLM", "Exl2Quantizer", "__version__"]


def __getattr__(name: str):
    if name in ("convert", "Exl2Quantizer"):
        from exl2conv import api

        return getattr(api, name)
    if name == "Exl2ForCausalLM":
        from exl2conv import runtime

        return runtime.Exl2ForCausalLM
    raise AttributeError(f"module 'exl2conv' has no attribute {name!r}")


hf_hook.install()
