"""Registers ``exl2`` with transformers' quantizers once transformers has them, whatever the order
of ``import exl2conv`` and ``import transformers`` (issue 30).

Why a hook: ``import exl2conv`` must stay light (no torch, no transformers: the command line and
the converter's workers import it), and transformers stays an optional extra, so exl2conv cannot
import transformers to register. transformers has no plugin entry point for quantization methods
either; ``register_quantizer`` must run in the process before ``from_pretrained`` reads the folder's
``quantization_config``. So:

- if ``transformers.quantizers.auto`` (where the registry lives) is imported already, register now;
- else put a finder on ``sys.meta_path`` (the import system's documented extension point, PEP 451)
  that lets that one module load as usual, then registers, then takes itself off the path.
  ``from_pretrained`` cannot run before it: modeling_utils imports ``transformers.quantizers``.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

WATCHED = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from exl2conv.runtime.hf_quantizer import register
    except ImportError as exc:  # a transformers without register_quantizer (before 4.46 or so)
        warnings.warn(f"exl2conv: this transformers cannot register the exl2 quantization method ({exc}); "
                      "load EXL2 folders with exl2conv.Exl2ForCausalLM.from_quantized", stacklevel=2)
        return
    register()


class _Loader(importlib.abc.Loader):
    """transformers' own loader for the watched module, then the registration."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        uninstall()  # once: the module is imported once per process
        for finder in sys.meta_path:  # the finders after us, as the import system would ask them
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if transformers' quantizers are loaded, else when they are."""
    if WATCHED in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
