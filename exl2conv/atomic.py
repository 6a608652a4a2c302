"""Durable, atomic writes: a crash at any instant leaves either the old file or the new one.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then renamed
over the target with ``os.replace``; the folder is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from exl2conv import faults
from exl2conv.errors import Exl2Error


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


def write_via_path(path: Path, writer: Callable[[str], None]) -> None:
    """Atomically create or replace ``path``; ``writer(tmp_path)`` writes the content to a
    temporary path in the same folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.point("write")
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Exl2Error(f"no space left on the device while writing {path}; free some space and "
                            "run the same command again to resume") from None
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise Exl2Error(f"cannot write {path}: {exc.strerror}; choose a writable folder") from None
        raise
    _fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_json(path: Path, obj: Any, indent: int = 4, ensure_ascii: bool = True) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + "\n"
    write_bytes(path, text.encode("utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically; tensors are moved to CPU and made contiguous."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_via_path(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
