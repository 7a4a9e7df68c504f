"""Safetensors headers read and checked by hand, and a writer that streams one tensor at a time.

The safetensors library reads tensors well, but on a malformed file it panics or returns errors that do not say
which file is wrong; and it can only write a whole dict of tensors at once. qexport needs both: a header checked
before any byte is written, and a file written tensor by tensor so that memory follows the largest tensor.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from typing import TYPE_CHECKING

from qexport.io import safe_fs
from qexport.errors import InputError

if TYPE_CHECKING:
    import torch

# safetensors dtype strings and the bytes per element they take. Reading and checking headers needs no torch, so
# `qexport inspect` stays torch-free (importing torch costs seconds); the torch dtypes come with DTYPES below.
ITEMSIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (decimal bytes)
# serde_json, which the library parses headers with, refuses 128 nested arrays/objects (the top object counts).
MAX_JSON_DEPTH = 127
# Tensors in one safetensors header. The largest public checkpoints hold a few thousand per shard (DeepSeek-V3:
# about 91k over 163 shards); 10^6 one-byte tensors took minutes and 2 GB to plan. Counted before parsing.
MAX_TENSORS_PER_FILE = 65_536
MAX_DIMS, MAX_DIM = 8, 2**40


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def __getattr__(name: str):
    """DTYPES (safetensors name -> torch dtype) and DTYPE_NAMES (the reverse), built on first use (imports torch)."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        if name in globals():
            return globals()[name]
        dtypes = _torch_dtypes()
        globals().update(DTYPES=dtypes, DTYPE_NAMES={dtype: n for n, dtype in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def itemsize(dtype_name: str) -> int:
    return ITEMSIZES[dtype_name]


def nbytes(dtype_name: str, shape) -> int:
    return itemsize(dtype_name) * math.prod(shape)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype name, shape and byte range within the data section."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    data_start: int = 0  # file offset of the data section (8 + header length)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path, root: Path | None = None) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header: JSON, known dtypes, sizes, and offsets that tile the data section.

    Returns the tensors by name and the `__metadata__` dict. Raises InputError naming the file and tensor.
    The file must be a regular file inside `root` (default: its own folder); see safe_fs.
    """
    try:
        with safe_fs.open_regular(path, root) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise InputError(f"{path}: safetensors header length {header_len} is above the safetensors "
                                 f"library's limit of {MAX_HEADER_BYTES:,} bytes")
            if 8 + header_len > size:
                raise InputError(
                    f"{path}: safetensors header length {header_len} is larger than the file ({size} bytes)"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise InputError(f"{path}: not found")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}")
    count = raw.count(b'"data_offsets"')  # an upper bound on the entries, without building them
    if count > MAX_TENSORS_PER_FILE:
        raise InputError(f"{path}: header lists {count:,} tensors, above qexport's limit of "
                         f"{MAX_TENSORS_PER_FILE:,} per file")
    header = parse_header_json(raw, path)
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is allowed, as in the library; [] or "" are not
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"{path}: safetensors __metadata__ is not an object of strings")
    data_len = size - 8 - header_len
    entries = {name: replace(_entry(path, name, info), data_start=8 + header_len) for name, info in header.items()}
    _check_layout(path, entries, data_len)
    return entries, metadata


class _NotLibraryJson(ValueError):
    """JSON that Python's json module reads but serde_json (the safetensors library's parser) refuses."""


def _unique_keys(pairs: list) -> dict:
    keys = {}
    for key, value in pairs:
        if key in keys:
            # the library refuses a repeated __metadata__ or entry field, and keeps the last of repeated tensor
            # names or metadata keys; other readers keep the first: a file two readers read differently is refused
            raise _NotLibraryJson(f"the key {key[:80]!r} twice")
        keys[key] = value
    return keys


def _no_constant(name: str):
    raise _NotLibraryJson(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotLibraryJson(f"number {text[:40]} is out of range")
    return value


def _int(text: str) -> int | float:
    if text == "-0":
        return -0.0  # serde_json reads -0 as a float: no size or offset
    if len(text) > 20:
        _float(text)  # past 64 bits serde_json reads a float; past the double range, nothing (Python: any size)
    return int(text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _library_json_problem(value) -> str | None:
    """What serde_json refuses in a value Python parsed: nesting past MAX_JSON_DEPTH, or a lone surrogate
    (an escape like \\ud800 that Python turns into a character and serde_json refuses)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return f"a lone surrogate escape in {item[:40]!r}"
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"nesting deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return None


def parse_header_json(raw: bytes, path: Path):
    """The header's JSON value, refused (InputError naming `path`) wherever the safetensors library's parser
    would refuse it, and where a key repeats; see qexport's tests for the measured differences."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                            parse_float=_float, parse_int=_int)
    except _NotLibraryJson as e:
        raise InputError(f"{path}: safetensors header has {e}")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise InputError(f"{path}: safetensors header is not JSON ({type(e).__name__}: {str(e)[:200]})")
    problem = _library_json_problem(header)
    if problem is not None:
        raise InputError(f"{path}: safetensors header has {problem}, which the safetensors library refuses")
    return header


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_len: int) -> None:
    """The tensors must tile the data section exactly, as the safetensors library requires (sorted by offsets)."""
    spans = sorted(entries.values(), key=lambda e: (e.start, e.end))
    offset = 0
    for e in spans:
        if e.start != offset:
            break
        offset = e.end
    else:  # contiguous from 0: only the total can disagree with the file
        if offset > data_len:
            cut = next(e for e in spans if e.end > data_len)
            raise InputError(
                f"{path}: truncated: tensor {cut.name!r} ends at data byte {cut.end} but the data section holds "
                f"{data_len} bytes (tensors need {offset})"
            )
        if offset < data_len:
            raise InputError(f"{path}: {data_len - offset} bytes after the last tensor belong to no tensor")
        return
    for e in spans:
        if e.end > data_len:
            raise InputError(
                f"{path}: tensor {e.name!r}: data_offsets [{e.start}, {e.end}] out of range "
                f"(data section is {data_len} bytes)"
            )
    for a, b in zip(spans, spans[1:]):
        if b.start < a.end:
            raise InputError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the data section")
    offset = 0
    for e in spans:
        if e.start > offset:
            raise InputError(f"{path}: {e.start - offset} bytes before tensor {e.name!r} belong to no tensor")
        offset = e.end


def _entry(path: Path, name: str, info) -> TensorEntry:
    if not isinstance(info, dict):
        raise InputError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise InputError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError(f"{path}: tensor {name!r}: shape {str(shape)[:100]} is not a list of non-negative integers")
    if len(shape) > MAX_DIMS or any(d > MAX_DIM for d in shape):
        # a zero-size tensor passes the byte count whatever its other dimensions; torch cannot build [0, 2**70]
        raise InputError(f"{path}: tensor {name!r}: shape {str(shape)[:100]} has more than {MAX_DIMS} dimensions "
                         f"or a dimension above 2**40")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise InputError(f"{path}: tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
    start, end = offsets
    if end - start != nbytes(dtype, shape):
        raise InputError(
            f"{path}: tensor {name!r}: data_offsets [{start}, {end}] hold {end - start} bytes but dtype {dtype} "
            f"shape {shape} needs {nbytes(dtype, shape)}"
        )
    return TensorEntry(name, path, dtype, tuple(shape), start, end)


def header_bytes(layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the padded JSON header for tensors laid out in the given order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the safetensors library does
    return struct.pack("<Q", len(raw)) + raw


def file_bytes(layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> int:
    """Exact size of the safetensors file `StreamWriter` writes for this layout."""
    return len(header_bytes(layout, metadata)) + sum(nbytes(d, s) for _, d, s in layout)


class StreamWriter:
    """Writes one safetensors file whose layout is known in advance, one tensor at a time, hashing as it goes."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self._pending = list(layout)
        self._sha = hashlib.sha256()
        self._file = open_for_writing(path)
        self._write(header_bytes(layout, metadata))

    def _write(self, data) -> None:
        self._sha.update(data)
        with _naming(self.path):
            self._file.write(data)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout; its name, dtype and shape must be the planned ones."""
        import torch

        expected = self._pending.pop(0) if self._pending else None
        actual = (name, __getattr__("DTYPE_NAMES").get(tensor.dtype), tuple(tensor.shape))
        if expected != actual:
            raise RuntimeError(f"{self.path}: tensor {actual} written where the plan has {expected}")
        self._write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))

    def close(self) -> str:
        """Finish the file (every planned tensor must be written) and return its sha256."""
        if self._pending:
            raise RuntimeError(f"{self.path}: closed with {len(self._pending)} planned tensors unwritten")
        # No fsync: atomicity comes from renaming the finished folder into place, which a killed process cannot
        # interrupt half-way. Waiting for the disk (about 1 s per GB here) would buy power-loss durability only,
        # which neither transformers' save_pretrained nor a plain copy give; `qexport verify` checks every sha256.
        with _naming(self.path):
            self._file.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Close after a failure; the caller removes the file (a second error, e.g. disk still full, is moot)."""
        try:
            self._file.close()
        except OSError:
            pass


def open_for_writing(path: Path):
    """A new file to append to: written past the page cache (`DirectFile`) where the filesystem allows it, else
    a plain buffered file (a filesystem that refuses O_DIRECT: tmpfs before Linux 6.6, some FUSE ones)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return DirectFile(path)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return open(path, "wb")


class DirectFile:
    """Appends to a new file with O_DIRECT, through a page-aligned staging buffer written in whole blocks; close()
    writes the last block padded and truncates the file to its length. Same bytes as a buffered write.

    Why: a buffered write first allocates page-cache pages for the whole output, and on the benchmark's VM fresh
    pages cost more than the write itself (1 GB: 0.2-2.5 s system CPU buffered, 0.1-0.24 s direct, measured with
    dd; int8 export of the 1b checkpoint: "write the output" 1.4-2.0 s CPU). The export is CPU-bound, waiting for
    the disk is not. The files are then not in the page cache: a later read of them comes from the disk."""

    BLOCK = 4096

    def __init__(self, path: Path, staging: int = 8 * 2**20):
        import mmap

        self._path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o666)
        self._buffer = mmap.mmap(-1, staging)  # anonymous maps are page-aligned, as O_DIRECT needs
        self._view = memoryview(self._buffer)
        self._used = self._size = 0
        self._buffered = None  # the plain file written instead when the filesystem refuses direct writes

    def write(self, data) -> int:
        if self._buffered is not None:
            return self._buffered.write(data)
        data = memoryview(data).cast("B")
        done = 0
        while done < len(data):
            take = min(len(data) - done, len(self._buffer) - self._used)
            self._view[self._used:self._used + take] = data[done:done + take]
            self._used += take
            done += take
            if self._used == len(self._buffer):
                self._flush(self._used)
                if self._buffered is not None:  # the flush fell back to plain writes
                    self._buffered.write(data[done:])
                    break
        return len(data)

    def _flush(self, length: int) -> None:
        """Write the staged bytes, `length` rounded up to whole blocks (the padding is truncated by close)."""
        length = -(-length // self.BLOCK) * self.BLOCK
        written = 0
        try:
            while written < length:
                written += os.write(self._fd, self._view[written:length])
        except OSError as e:
            if e.errno != errno.EINVAL or self._size or written:
                raise
            # Opened with O_DIRECT but the first write refused (some FUSE or network filesystems): plain writes.
            os.close(self._fd)
            self._fd = None
            self._buffered = open(self._path, "wb")
            self._buffered.write(self._view[:self._used])
            self._used = 0
            return
        self._size += self._used
        self._used = 0

    @property
    def closed(self) -> bool:
        return self._buffer.closed

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._buffered is not None:
                self._buffered.close()
            elif self._fd is not None:
                size = self._size + self._used
                if self._used:
                    self._view[self._used:-(-self._used // self.BLOCK) * self.BLOCK] = bytes(
                        -self._used % self.BLOCK)
                    self._flush(self._used)
                if self._buffered is not None:
                    self._buffered.close()
                else:
                    os.ftruncate(self._fd, size)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._view.release()
            self._buffer.close()


@contextlib.contextmanager
def _naming(path: Path):
    """Errors from writes (ENOSPC, EIO) carry no file name; add it, so the one-line error can say which file."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def sha256_file(path: Path, chunk: int = 2**20, root: Path | None = None, check=None) -> str:
    """sha256 of a regular file inside `root` (default: its own folder). `check(f)`, if given, is called on the
    open file before and after it is read (it raises when the file is not the one expected).

    Read into one reused buffer that stays in the CPU cache: 1.96 GB hash in 1.37 s CPU here, against 1.56 s in a
    fresh 16 MB block per read."""
    sha = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with safe_fs.open_regular(path, root, buffering=0) as f:
        if check is not None:
            check(f)
        while got := f.readinto(buffer):
            sha.update(view[:got])
        if check is not None:
            check(f)
    return sha.hexdigest()
