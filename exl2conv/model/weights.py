"""A lazy index of a model's safetensors tensors.

Only headers are read up front (the 8-byte length, then the JSON header), so opening a 70B
model costs a few kilobytes of RAM. A tensor is read when asked for, one at a time; the tensors
wanted next can be read ahead from the disk in the background (:meth:`WeightIndex.read_ahead`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .. import settings
from ..errors import Exl2Error, FormatError

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype string -> (torch dtype, bytes per element). Reading supports the float ones.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
READABLE = ("F16", "BF16", "F32", "F64")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf, checked a slice of about 64 MiB at a time: ``isfinite``
    over a whole tensor holds temporaries of about twice its size (6 GiB over the 3.6 GiB
    calibration states of a Llama-2-7B quantization pass). One host sync at the end."""
    flat = t.reshape(-1)
    step = max(1, (64 << 20) // max(1, flat.element_size()))
    ok = torch.ones((), dtype=torch.bool, device=flat.device)
    for a in range(0, flat.numel(), step):
        ok &= torch.isfinite(flat[a:a + step]).all()
    return bool(ok)


def open_tensors(files: list[Path], stack: ExitStack) -> dict[str, object]:
    """Tensor name -> the open safetensors handle holding it, over ``files`` (opened lazily on the
    CPU, kept open by ``stack``): how the EXL2 readers (eval's decoded forward, the runtime's
    loaders) reach a folder's tensors one at a time. A file that is not safetensors: FormatError."""
    where: dict[str, object] = {}
    for f in files:
        try:
            h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own type for every bad header)
            raise FormatError(f"{f}: not a readable safetensors file ({exc})") from None
        for k in h.keys():
            where[k] = h
    return where


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where its data starts in the file, in bytes
    nbytes: int = 0


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check it against the file size, so a truncated or
    corrupt file fails here, naming the file, rather than halfway through a conversion."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(size - 8, MAX_HEADER):
                raise FormatError(f"{path} is not a safetensors file (bad or truncated header); "
                                  f"download it again")
            header = json.loads(f.read(n))
    except OSError as e:
        raise Exl2Error(f"{path} cannot be read: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FormatError(f"{path} has a corrupt safetensors header; download it again") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} has a corrupt safetensors header; download it again")
    data_size = size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            nbytes = math.prod(shape) * DTYPES[dtype][1] if dtype in DTYPES else end - begin
            ok = 0 <= begin <= end and end - begin == nbytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise FormatError(f"{path}: header entry for {name!r} is corrupt; download the file again")
        if end > data_size:
            raise FormatError(f"{path} is truncated ({size} bytes, tensor {name!r} ends at byte "
                              f"{8 + n + end}); download it again")
        out[name] = TensorEntry(path, dtype, shape, 8 + n + begin, end - begin)
    return out


class ReadAhead:
    """Reads byte ranges of files on a background thread and throws the bytes away, so that the
    operating system's page cache holds them when they are wanted: the next module's weights come
    off the disk while this module computes. On Linux through ``sendfile`` into /dev/null (the
    kernel reads the pages and copies nothing; a range already cached costs next to nothing), else
    plain reads into one reused buffer (``posix_fadvise(WILLNEED)`` is ignored on some file
    systems). Only the newest request counts: a request still being read when a newer one comes
    is dropped, so the thread never falls behind the reader it serves. A range that cannot be read
    is skipped (the real read reports it). The thread ends after :attr:`IDLE_S` seconds without
    a request and starts again with the next one."""

    CHUNK = 64 << 20  # between chunks the thread takes the GIL and looks for a newer request
    READ_CHUNK = 8 << 20  # the plain reads' buffer
    IDLE_S = 30.0

    def __init__(self):
        self._cv = threading.Condition()
        self._pending: list[tuple[Path, int, int]] | None = None
        self._thread: threading.Thread | None = None
        self._busy = False
        self.sendfile = hasattr(os, "sendfile")  # False once it fails: plain reads from then on
        self._buf: memoryview | None = None
        self.bytes_read = 0  # for tests and benchmarks

    def submit(self, ranges: list[tuple[Path, int, int]]) -> None:
        """Read these ``(file, offset, nbytes)`` ranges next, in the background."""
        with self._cv:
            self._pending = list(ranges)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="exl2conv-read-ahead", daemon=True)
                self._thread.start()
            self._cv.notify()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Whether every request so far has been read (or dropped) within ``timeout`` seconds."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: self._pending is not None, self.IDLE_S):
                    self._thread = None  # the next submit starts another
                    return
                ranges, self._pending, self._busy = self._pending, None, True
            try:
                self._read(ranges)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _read(self, ranges: list[tuple[Path, int, int]]) -> None:
        for path, offset, nbytes in ranges:
            try:
                with open(path, "rb", buffering=0) as f:
                    end = offset + nbytes
                    while offset < end:
                        if self._pending is not None:  # the reader has moved on: serve it instead
                            return
                        got = self._chunk(f, offset, min(end - offset, self.CHUNK))
                        if not got:
                            break
                        offset += got
                        self.bytes_read += got
            except OSError:
                continue

    def _chunk(self, f, offset: int, n: int) -> int:
        if self.sendfile:
            try:
                with open(os.devnull, "wb", buffering=0) as null:
                    return os.sendfile(null.fileno(), f.fileno(), offset, n)
            except OSError:
                self.sendfile = False  # e.g. macOS, whose sendfile writes to sockets only
        if self._buf is None:
            self._buf = memoryview(bytearray(self.READ_CHUNK))
        f.seek(offset)
        return f.readinto(self._buf[:min(n, self.READ_CHUNK)])


class WeightIndex:
    """name -> (file, dtype, shape) over a model folder's safetensors files.

    With ``model.safetensors.index.json`` only the shards it names are used (every one must
    exist); otherwise every ``*.safetensors`` file in the folder is."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise Exl2Error(f"{self.model_dir} is not a folder; -i must name a Hugging Face model folder")
        self.entries: dict[str, TensorEntry] = {}
        self._weight_map: dict[str, str] = {}
        # None: no reading ahead (EXL2CONV_READ_AHEAD=0)
        self.ahead: ReadAhead | None = ReadAhead() if settings.active().read_ahead else None
        for file in self._files():
            for name, entry in read_header(file).items():
                if name in self.entries:
                    raise Exl2Error(f"tensor {name!r} is in both {self.entries[name].file.name} and "
                                    f"{file.name} in {self.model_dir}; remove the stray file")
                self.entries[name] = entry
        self._check_index_names()

    def _files(self) -> list[Path]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            return self._files_from_index(index)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if files:
            return files
        if any(next(self.model_dir.glob(p), None) for p in ("*.bin", "*.pt", "*.pth")):
            raise Exl2Error(f"{self.model_dir} holds only PyTorch pickle weights (.bin/.pt); convert "
                            f"them first with `exl2conv to-safetensors {self.model_dir}`")
        raise Exl2Error(f"{self.model_dir} has no *.safetensors weight files")

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise Exl2Error(f"{index} is not a valid index (no 'weight_map' object); fix or "
                            f"delete it") from None
        self._weight_map = weight_map
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            path = self.model_dir / str(shard)
            if not path.is_file():
                raise Exl2Error(f"{index.name} names shard {shard!r}, which is missing from "
                                f"{self.model_dir}; download it")
            files.append(path)
        return files

    def _check_index_names(self):
        for name, shard in self._weight_map.items():
            entry = self.entries.get(name)
            if entry is None or entry.file != self.model_dir / str(shard):
                raise Exl2Error(f"{INDEX_FILE} puts {name!r} in {shard}, but that file does not "
                                f"hold it; the index and the shards do not match")

    # -- queries ------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.entries

    __contains__ = has

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise Exl2Error(f"tensor {name!r} is not in the safetensors files in {self.model_dir}") from None

    def source_dtype(self, name: str) -> torch.dtype:
        """The torch dtype the tensor is stored in."""
        return DTYPES[self.entry(name).dtype][0]

    def held_dtype(self, name: str, compact: bool) -> torch.dtype:
        """The dtype a tensor is read into for the forwards: its 2-byte source dtype (float16,
        bfloat16) with ``compact``, which the forwards widen exactly one product at a time, else
        float32."""
        src = self.source_dtype(name)
        return src if compact and src in (torch.float16, torch.bfloat16) else torch.float32

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def read_ahead(self, names: list[str]) -> None:
        """Start reading these tensors' bytes from the disk in the background (:class:`ReadAhead`),
        in file order; names not in the index are ignored. Returns at once."""
        if self.ahead is None:
            return
        found = sorted({(e.file, e.offset, e.nbytes) for e in (self.entries.get(n) for n in names) if e is not None})
        merged: list[tuple[Path, int, int]] = []
        for path, offset, nbytes in found:  # one range per run of adjacent tensors
            if merged and merged[-1][0] == path and merged[-1][1] + merged[-1][2] == offset:
                merged[-1] = (path, merged[-1][1], merged[-1][2] + nbytes)
            else:
                merged.append((path, offset, nbytes))
        if merged:
            self.ahead.submit(merged)

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise one Exl2Error for the first missing or misshapen tensor (and count the rest),
        before any work starts."""
        problems = []
        for name, shape in expected.items():
            e = self.entries.get(name)
            if e is None:
                problems.append(f"tensor {name!r} is missing from the safetensors files in {self.model_dir}")
            elif tuple(e.shape) != tuple(shape):
                problems.append(f"tensor {name!r} in {e.file} has shape {list(e.shape)}, but "
                                f"config.json implies {list(shape)}")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise Exl2Error(problems[0] + more)

    def get(self, name: str, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None,
            rows: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        """Read one tensor from disk and return it as ``dtype`` on ``device`` (CPU if None).
        ``rows`` = ((start, end), ...) reads only those ranges of the first dimension, one after
        another (one linear of a fused source: Phi-3's q_proj is one range of qkv_proj,
        InternLM2's one range per key/value head of wqkv)."""
        e = self.entry(name)
        if e.dtype not in READABLE:
            raise Exl2Error(f"tensor {name!r} in {e.file} is {e.dtype}; only float16, bfloat16 and "
                            f"float32 sources can be converted")
        try:
            with safe_open(str(e.file), framework="pt", device="cpu") as f:
                if rows is None:
                    t = f.get_tensor(name)
                else:
                    part = f.get_slice(name)
                    t = torch.cat([part[a:b] for a, b in rows]) if len(rows) > 1 else part[rows[0][0]:rows[0][1]]
        except Exception as err:  # safetensors raises its own error type or OSError
            raise FormatError(f"{e.file}: reading {name!r} failed ({err}); download the file again") from None
        # Move before casting: the copy to a GPU is then at the (smaller) source width, and the
        # check below runs there (on a CPU it took longer than the copy).
        if device is not None:
            t = t.to(device=device)
        if not all_finite(t):
            # one pass over the source tensor, cheap next to anything done with it
            raise Exl2Error(f"tensor {name!r} in {e.file} holds NaN or Inf values; the model is broken "
                            "(a bad download or a failed fine-tune): fix or replace it before converting")
        return t.to(dtype)
