"""The CUDA extension (csrc/): built on first use into a cache, under a file lock.

``get()`` returns the loaded module, or None when the kernels cannot be used here (no CUDA, no
toolchain, no csrc/ beside the package, or ``EXL2CONV_NO_KERNELS=1``). Code does not call the
kernels directly: :mod:`exl2conv.ops` has one function per kernel of :data:`OPS`, which runs the
kernel or its named torch reference, the arithmetic the kernel reproduces.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import sys
import time
from pathlib import Path

from exl2conv import atomic, settings

PACKAGE = Path(__file__).resolve().parent
# Where the kernel sources are: inside the package when installed from a wheel (pyproject.toml ships
# csrc/ as exl2conv/_csrc), at the repository root in a source checkout or an editable install.
CSRC_PLACES = (PACKAGE / "_csrc", PACKAGE.parent / "csrc")


def find_csrc() -> Path:
    """The first of :data:`CSRC_PLACES` that holds kernel sources (the repository's when none does)."""
    for place in CSRC_PLACES:
        if any(place.glob("*.cu")):
            return place
    return CSRC_PLACES[-1]


CSRC = find_csrc()
NAME = "exl2conv_ext"
OPS = ("gptq_block", "pgrid_err_many", "refine_qs_many", "codes_of", "coded_delta", "params_start", "params_finish",
       "exl2_dequant", "exl2_gemv")
_state: dict = {}
log = logging.getLogger("exl2conv")


def cache_dir() -> Path:
    import torch

    tag = f"torch{torch.__version__.split('+')[0]}-cu{(torch.version.cuda or 'none').replace('.', '')}"
    return settings.cache_root() / "ext" / tag


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu"))


def get():
    """The extension module, or None (then the torch path is used)."""
    if not settings.active().kernels:
        return None
    if "mod" in _state:
        return _state["mod"]
    _state["mod"] = None
    import torch

    if not torch.cuda.is_available():
        return None
    if not sources():
        places = " or ".join(str(p) for p in CSRC_PLACES)
        print(f" !! Warning: the CUDA kernel sources are not installed (looked in {places}); using the slower "
              "torch path. Install exl2conv from its repository or a wheel built from it.", file=sys.stderr)
        return None
    try:
        _state["mod"] = _build()
    except Exception as exc:  # noqa: BLE001 - any build failure falls back, loudly
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        print(f" !! Warning: the CUDA kernels could not be built ({msg}); using the slower torch path. "
              "Install a CUDA toolkit (nvcc) matching torch and ninja to enable them.", file=sys.stderr)
    return _state["mod"]


CFLAGS = ["-O3"]
CUDA_CFLAGS = ["-O3", "-lineinfo"]


def headers() -> list[Path]:
    """The headers the sources include: a change to one must rebuild the library too."""
    return sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))


def stamp(arch: str) -> str:
    """What a built library was built from: the sources and their headers, the flags and the GPU
    architecture."""
    h = hashlib.sha256()
    for src in sources() + headers():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(repr((CFLAGS, CUDA_CFLAGS, arch)).encode())
    return h.hexdigest()


def _build():
    import torch

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    arch = settings.cuda_arch_list(f"{major}.{minor}")
    library = build / f"{NAME}.so"
    stamp_file = build / "sources.sha256"
    want = stamp(arch)
    t0 = time.monotonic()
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes
        try:
            if library.is_file() and stamp_file.is_file() and stamp_file.read_text() == want:
                # built from these very sources: load it without cpp_extension (which imports
                # setuptools and runs ninja to find out the same, about a second per conversion)
                torch.ops.load_library(str(library))
            else:
                from torch.utils import cpp_extension

                # registers operators under torch.ops.exl2conv (no Python module: no pybind11 to compile)
                cpp_extension.load(
                    name=NAME,
                    sources=[str(s) for s in sources()],
                    build_directory=str(build),
                    extra_cflags=CFLAGS,
                    extra_cuda_cflags=CUDA_CFLAGS,
                    is_python_module=False,
                    verbose=False,
                )
                atomic.write_bytes(stamp_file, want.encode())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    mod = torch.ops.exl2conv
    for fn in OPS:
        if not hasattr(mod, fn):
            raise RuntimeError(f"the built extension lacks {fn}")
    took = time.monotonic() - t0
    if took > 5:
        print(f" -- Built CUDA kernels in {took:.0f} s (cached in {build})", file=sys.stderr)
    return mod
