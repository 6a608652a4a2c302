"""exl2conv: convert Hugging Face models to ExLlamaV2's EXL2 format.

Nothing runs at import time and nothing heavy is imported: the command line lives in
:mod:`exl2conv.cli`, and the Python API (``exl2conv.convert(...)``, ``exl2conv.Exl2Quantizer``) is loaded from :mod:`exl2conv.api` on first use.
"""

import sys
import types

__version__ = "0.1.0"

# The EXL2 format version written into quantization_config; ExLlamaV2 0.3.2 writes its
# own package version there and its loader never reads it.
EXL2_FORMAT_VERSION = "0.3.2"

__all__ = ["convert", "Exl2Quantizer", "__version__"]


class _CallableModule(types.ModuleType):
    """The submodule exl2conv.convert, callable as the API function exl2conv.api.convert.

    ``exl2conv.convert`` must be both the submodule (``from exl2conv.convert import Summary``,
    monkeypatching) and the API function; importing a submodule always sets the package attribute
    to the module, so the module itself is made callable instead of shadowing it."""

    def __call__(self, *args, **kwargs):
        from exl2conv.api import convert

        return convert(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name == "convert" and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "convert":
        import exl2conv.convert  # noqa: F401 - the import binds (and makes callable) the attribute

        return sys.modules["exl2conv.convert"]
    if name == "Exl2Quantizer":
        from exl2conv.api import Exl2Quantizer

        return Exl2Quantizer
    raise AttributeError(f"module 'exl2conv' has no attribute {name!r}")
