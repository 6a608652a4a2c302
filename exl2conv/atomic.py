"""Durable, atomic writes: a crash at any instant leaves either the old file or the new one.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then renamed
over the target with ``os.replace``; the folder is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from exl2conv import faults
from exl2conv.errors import Exl2Error

TEMP_SUFFIX = ".tmp"
# tempfile.mkstemp adds 8 random characters from [a-z0-9_]
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# safetensors (0.6 and later) writes its file through a temporary of the Rust tempfile crate in the
# same folder, ".tmp" and 6 random letters or digits, then renames it: a kill in between leaves one
_RUST_TEMP_NAME = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: Path, writer: Callable[[Any], None]) -> None:
    """Atomically create or replace ``path``; ``writer(fileobj)`` writes the content."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            writer(f)

    write_via_path(path, to_file)


def _umask() -> int:
    # reading the umask means setting it; it is read once, before any thread of ours writes
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def write_via_path(path: Path, writer: Callable[[str], None]) -> None:
    """Atomically create or replace ``path``; ``writer(tmp_path)`` writes the content to a
    temporary path in the same folder (named ``.<name>.<random>.tmp``, see :func:`remove_temps`)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        writer(tmp)
        # mkstemp makes the file 0600 (and safetensors' writer replaces it with a 0600 file of its
        # own); a model folder should get the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.point("write", tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        err = user_error(exc, path)
        if err is not None:
            raise err from None
        raise
    _fsync_dir(path.parent)


def user_error(exc: BaseException, path: Path) -> Exl2Error | None:
    """The one-line error for a failed write of ``path`` that the user can fix (disk full, no
    permission, missing folder), or None. safetensors reports I/O errors as its own exception
    type with the OS message inside, so the message is checked too."""
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "Disk quota" in text:
        return Exl2Error(f"no space left on the device while writing {path}; nothing was damaged: free "
                         "some space and run the same command again to resume")
    if code in (errno.EACCES, errno.EROFS, errno.EPERM) or "Permission denied" in text:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "permission denied"
        return Exl2Error(f"cannot write {path}: {reason}; choose a writable folder")
    if code == errno.ENOENT and not Path(path).parent.is_dir():
        return Exl2Error(f"cannot write {path}: the folder {Path(path).parent} does not exist (was it "
                         "removed while the job ran?); run the same command again to resume")
    return None


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is that of a temporary file an interrupted write of ours leaves."""
    return bool(_TEMP_NAME.match(name) or _RUST_TEMP_NAME.match(name))


def remove_temps(folder: Path) -> list[str]:
    """Remove the temporary files an interrupted write left in ``folder`` (only names of the
    form ``.<name>.<random>.tmp`` that :func:`write_via_path` makes, and ``.tmp<6 random>`` that
    safetensors makes inside it); returns their names."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        if is_temp_name(p.name) and p.is_file() and not p.is_symlink():
            remove(p)
            removed.append(p.name)
    return removed


def write_bytes(path: Path, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_json(path: Path, obj: Any, indent: int = 4, ensure_ascii: bool = True) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + "\n"
    write_bytes(path, text.encode("utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically; tensors are moved to CPU and made contiguous."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_via_path(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def save_tensor_streamed(path: Path, name: str, tensor: torch.Tensor, rows_per_write: int = 1) -> None:
    """One float32 tensor as a safetensors file, written atomically a few rows (along dim 0) at a
    time: a device tensor of several GiB (the calibration states) never needs a host copy, nor
    does serialization build one. The file is what ``safetensors.save_file`` would write."""
    if tensor.dtype != torch.float32:
        raise ValueError(f"save_tensor_streamed writes float32, got {tensor.dtype}")
    nbytes = tensor.numel() * 4
    header = json.dumps({name: {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors pads it

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for r in range(0, tensor.shape[0], rows_per_write):
                f.write(tensor[r:r + rows_per_write].detach().to("cpu").contiguous().numpy().tobytes())
    write_via_path(path, write)


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
