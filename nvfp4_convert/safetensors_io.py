"""Streaming safetensors I/O: the pieces the ``safetensors`` library does not offer.

- ``read_header``: parse and validate one file's header without reading its data; every problem
  (header longer than the file, bad JSON, unknown dtype, offsets outside the data, overlapping or
  size-inconsistent tensors) is a ``ConvertError`` naming the file and tensor.
- ``read_rows``: the bytes of a band of rows of one tensor, read with ``pread`` (memory = the band).
- ``ShardWriter``: writes a safetensors file whose header is known up front, tensor by tensor,
  under a temporary name; ``commit`` fsyncs and renames it into place, so a crash never leaves a
  complete-looking shard. Raw byte ranges of source files are copied with ``O_DIRECT`` reads and
  writes (``direct_io``) or, where the filesystem refuses those, with ``copy_file_range``.

Files written here are read back by ``safetensors`` itself in the tests.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .direct_io import DirectFile, read_chunks
from .errors import ConvertError

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validated tensor table and ``__metadata__`` of one safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError("file shorter than the 8-byte header length", file=path)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConvertError(f"header length {n} larger than the file ({size} bytes)", file=path)
            if n > MAX_HEADER:
                raise ConvertError(f"header length {n} exceeds {MAX_HEADER}", file=path)
            raw = f.read(n)
    except OSError as e:
        raise ConvertError(f"cannot read: {e.strerror}", file=path) from e
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a huge integer, absurd nesting
        raise ConvertError(f"invalid header JSON: {str(e)[:200]}", file=path) from None
    if not isinstance(header, dict):
        raise ConvertError("header is not a JSON object", file=path)
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_len)
    _check_layout(path, tensors.values(), data_start)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ConvertError("header entry lacks dtype/shape/data_offsets", file=path, tensor=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r}", file=path, tensor=name)
    # type() is int, not isinstance: JSON true/false are Python bools, which isinstance counts as ints
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ConvertError(f"invalid shape {shape!r}", file=path, tensor=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ConvertError(f"invalid data_offsets {offsets!r}", file=path, tensor=name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ConvertError(f"invalid data_offsets {offsets}", file=path, tensor=name)
    if end > data_len:
        raise ConvertError(
            f"data_offsets {offsets} outside the data ({data_len} bytes): file truncated?", file=path, tensor=name
        )
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise ConvertError(
            f"data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}", file=path, tensor=name
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_layout(path: Path, tensors: Iterable[TensorInfo], data_start: int) -> None:
    previous: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: (t.start, t.end)):
        if previous is not None and t.start < previous.end:
            raise ConvertError(f"data overlaps tensor {previous.name!r}", file=path, tensor=t.name)
        previous = t


def read_rows(info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
    """Rows ``[row_start, row_end)`` of a tensor (all of it for a 0-D/1-D tensor), as a torch tensor."""
    if len(info.shape) < 2:
        offset, nbytes, shape = info.start, info.nbytes, info.shape
    else:
        rows = info.shape[0]
        row_end = rows if row_end is None else min(row_end, rows)
        row_bytes = info.nbytes // rows if rows else 0
        offset = info.start + row_start * row_bytes
        nbytes = (row_end - row_start) * row_bytes
        shape = (row_end - row_start, *info.shape[1:])
    buf = bytearray(nbytes)
    with open(info.file, "rb", buffering=0) as f:
        got = f.readinto(memoryview(buf)) if f.seek(offset) == offset else 0
    if got != nbytes:
        raise ConvertError(f"short read ({got} of {nbytes} bytes)", file=info.file, tensor=info.name)
    if nbytes == 0:
        return torch.empty(shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(info.torch_dtype).reshape(shape)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The whole tensor (only for tensors the caller knows to be small, or bounded by design)."""
    return read_rows(info)


@dataclass(frozen=True)
class OutEntry:
    """One tensor of an output shard: name, safetensors dtype string, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def encode_header(entries: list[OutEntry], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix + JSON padded with spaces to 8 bytes) for tensors stored in order."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Write one safetensors file whose tensors are known in advance.

    The header is written first; every tensor then has a fixed byte range, filled through its
    ``TensorSink`` (``writer.sink(name)``) in order within the tensor, or by ``copy_run`` for
    consecutive tensors copied from one source range, independently of the other tensors: two
    threads may fill different tensors at once (positional writes). Data goes to
    ``<final>.partial``; ``commit()`` checks every byte was written, fsyncs and renames; ``abort()``
    (or leaving a ``with`` block on an exception) removes the partial file.

    ``direct=True`` writes every byte with ``O_DIRECT`` (``direct_io.DirectFile``) and reads copied
    ranges with ``O_DIRECT``; otherwise writes are buffered and copies use ``copy_file_range``.
    The file's bytes are the same either way.
    """

    def __init__(self, final: Path, entries: list[OutEntry], *, direct: bool = False) -> None:
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self.entries = {e.name: e for e in entries}
        header = encode_header(entries)
        self.offsets: dict[str, int] = {}
        pos = len(header)
        for e in entries:
            self.offsets[e.name] = pos
            pos += e.nbytes
        self.size = pos
        self.written: dict[str, int] = dict.fromkeys(self.entries, 0)
        self.fsync_seconds = 0.0
        self.direct = DirectFile(self.partial, self.size) if direct else None
        self.fd = self.direct.fd if self.direct else create_new(self.partial)
        self.pwrite(memoryview(header), 0)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def sink(self, name: str) -> TensorSink:
        return TensorSink(self, name)

    def pwrite(self, view: memoryview, offset: int) -> None:
        """Write bytes at a file offset (callers claim the range first)."""
        if self.direct:
            self.direct.pwrite(view, offset)
        else:
            _pwrite_all(self.fd, view, offset)

    def _claim(self, name: str, nbytes: int) -> int:
        """File offset for the next ``nbytes`` of tensor ``name``; checks the header's size."""
        entry = self.entries.get(name)
        if entry is None:
            raise ConvertError("tensor not in this shard's header", file=self.final, tensor=name)
        done = self.written[name]
        if done + nbytes > entry.nbytes:
            raise ConvertError(
                f"{done + nbytes} bytes written, header says {entry.nbytes}", file=self.final, tensor=name
            )
        self.written[name] = done + nbytes  # one thread per tensor: no other writer of this key
        return self.offsets[name] + done

    def copy_run(
        self,
        names: list[str],
        src: Path,
        start: int,
        *,
        inspect: Callable[[int, memoryview], None] | None = None,
        progress: Callable[[int], None] | None = None,
        chunks: Iterable[tuple[int, memoryview]] | None = None,
    ) -> None:
        """Fill the consecutive tensors ``names`` (whole) with the bytes of ``src`` from ``start``.

        ``inspect(offset, view)`` sees every source byte (in chunks, at its offset in ``src``)
        before it is written; ``progress(nbytes)`` is called after each chunk is written. With
        ``direct``, ``chunks`` may supply those bytes already read (``direct_io.ReadAhead``).
        """
        offset = self.offsets[names[0]] if names else 0
        nbytes = 0
        for name in names:
            if self._claim(name, self.entries[name].nbytes) != offset + nbytes:
                raise ConvertError("copy run is not contiguous in the shard", file=self.final, tensor=name)
            nbytes += self.entries[name].nbytes
        shift = offset - start
        if self.direct:
            for pos, view in chunks if chunks is not None else read_chunks(src, start, nbytes):
                if inspect:
                    inspect(pos, view)
                self.direct.pwrite(view, pos + shift)
                if progress:
                    progress(len(view))
            return
        with open(src, "rb") as fin:
            for pos in range(start, start + nbytes, COPY_CHUNK):
                n = min(COPY_CHUNK, start + nbytes - pos)
                if inspect:
                    try:
                        _inspect_mapped(fin.fileno(), pos, n, inspect)
                    except ValueError as e:  # mmap of a range the file no longer has
                        raise ConvertError(f"source changed during the run: {e}", file=src) from e
                copy_file_range(fin.fileno(), self.fd, pos, n, pos + shift)
                if progress:
                    progress(n)

    def commit(self) -> None:
        """Check completeness, fsync, rename into place and fsync the directory (``fsync_seconds``)."""
        missing = [n for n, e in self.entries.items() if self.written[n] != e.nbytes]
        if missing:
            self.abort()
            raise ConvertError("shard incomplete at commit", file=self.final, tensor=missing[0])
        t = time.perf_counter()
        if self.direct:
            self.direct.finish()
        else:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        self.fsync_seconds = time.perf_counter() - t

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.partial.unlink(missing_ok=True)


class TensorSink:
    """Appends the bytes of one tensor of a ``ShardWriter`` at its place in the file."""

    def __init__(self, writer: ShardWriter, name: str) -> None:
        self.writer = writer
        self.name = name

    def write(self, data: torch.Tensor | bytes | memoryview) -> None:
        """Append bytes (a contiguous tensor's storage or a buffer)."""
        if isinstance(data, torch.Tensor):
            data = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        view = memoryview(data).cast("B")
        self.writer.pwrite(view, self.writer._claim(self.name, len(view)))


def _inspect_mapped(fd: int, start: int, nbytes: int, inspect: Callable[[int, memoryview], None]) -> None:
    """``inspect`` a file range through a transient read-only map (pages it touches are then cached
    for the kernel copy that follows)."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, start + nbytes - base, access=mmap.ACCESS_READ, offset=base)
    view = memoryview(mm)[start - base :]
    try:
        inspect(start, view)
    finally:
        try:
            view.release()
            mm.close()
        except BufferError:  # a view escaped in an exception's traceback: the map closes with it
            pass


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


def copy_file_range(src_fd: int, dst_fd: int, src_offset: int, nbytes: int, dst_offset: int) -> None:
    """Copy ``nbytes`` from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset`` (kernel-side)."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, min(COPY_CHUNK, nbytes - done), src_offset + done, dst_offset + done)
            if n == 0:
                raise ConvertError(f"source ended after {done} of {nbytes} bytes")
            done += n
        return
    except OSError as e:
        if e.errno not in _NO_COPY_FILE_RANGE:
            raise
        # Not supported between these files or filesystems: copy what remains through userspace.
    while done < nbytes:
        chunk = os.pread(src_fd, min(COPY_CHUNK, nbytes - done), src_offset + done)
        if not chunk:
            raise ConvertError(f"source ended after {done} of {nbytes} bytes")
        _pwrite_all(dst_fd, memoryview(chunk), dst_offset + done)
        done += len(chunk)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_new(path: Path, extra_flags: int = 0) -> int:
    """A write descriptor on a brand-new file at ``path``: whatever was there (a stale temp file, or a hard link or
    symlink that leads into SRC) is unlinked first, never opened and truncated."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | extra_flags, 0o644)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, fsync, rename into place."""
    tmp = path.with_name(path.name + ".partial")
    with os.fdopen(create_new(tmp), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def check_readable(path: Path, names: list[str]) -> None:
    """A written shard, opened by the ``safetensors`` library itself, holds exactly ``names`` (else one line)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            got = set(f.keys())
    except Exception as e:  # safetensors raises its own error types
        raise ConvertError(f"written shard unreadable by safetensors: {e}", file=path) from e
    if got != set(names):
        missing, extra = sorted(set(names) - got)[:3], sorted(got - set(names))[:3]
        raise ConvertError(f"written shard holds other tensors (missing {missing}, extra {extra})", file=path)
