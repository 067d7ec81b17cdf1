"""Direct I/O (``O_DIRECT``): shard bytes that never pass through the page cache.

Why: a buffered copy (``copy_file_range``, ``sendfile``, ``cp``) makes the kernel copy every byte
through the page cache. On the 2-vCPU VM of BENCHMARKS.md that costs 8-27 s of system CPU per
5 GB and is the whole wall time; reading and writing the same 5 GB with ``O_DIRECT`` costs
0.5-0.8 s of CPU and runs at the disk's speed. On the GPU node it also keeps 881 GB of
once-read data from evicting everything else from the page cache.

Contract:
- ``DirectFile(path, size)`` creates a file of exactly ``size`` bytes, written by positional
  ``pwrite(data, offset)`` calls of any length, at any offset, from any thread, each byte exactly
  once. Whole ``BLOCK``-aligned blocks go to the device from a page-aligned staging buffer; the
  bytes of a block shared with a neighbouring write wait in memory until the block is complete.
  Every byte of the file is written with ``O_DIRECT``: direct and buffered writes never mix on
  one page. ``finish()`` checks that no block is left incomplete, trims the last block's padding
  and fsyncs.
- ``read_chunks(path, start, nbytes)`` yields ``(offset, view)`` pieces covering
  ``[start, start + nbytes)`` of a file, read with ``O_DIRECT`` in aligned chunks of ``CHUNK``
  into a reusable page-aligned buffer of the calling thread. A view is valid only until the next
  one is produced, and a thread reads one range at a time.
- ``refusal(directory, sample)`` says why a filesystem refuses ``O_DIRECT`` (None: it accepts it).

Memory: one read buffer and one staging buffer of ``CHUNK`` bytes per thread that uses them, plus
one ``BLOCK`` per incomplete block.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

BLOCK = 4096  # file-offset and length alignment: the page size, so no page is shared by two writes
CHUNK = 64 * 1024 * 1024  # bytes per direct read or write: large sequential requests

_local = threading.local()


def _thread_buffer(name: str) -> memoryview:
    """A page-aligned anonymous buffer of ``CHUNK`` bytes, one per thread and name, reused."""
    buf = getattr(_local, name, None)
    if buf is None:
        buf = memoryview(mmap.mmap(-1, CHUNK))
        setattr(_local, name, buf)
    return buf


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    """``pwrite`` all of an aligned view with ``O_DIRECT``; a short write must stay aligned."""
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0 or n % BLOCK:
            raise OSError(errno.EIO, f"short direct write ({n} of {len(view)} bytes)")
        view, offset = view[n:], offset + n


class DirectFile:
    """A new file of ``size`` bytes written once, in any order, with ``O_DIRECT`` (see module doc)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._partial: dict[int, tuple[bytearray, int]] = {}  # block -> (bytes, bytes filled)
        self._lock = threading.Lock()
        self._written = 0  # bytes handed to pwrite (each byte exactly once): must reach ``size``
        self._block = memoryview(mmap.mmap(-1, BLOCK))  # aligned copy of one assembled block
        path.unlink(missing_ok=True)  # never open (and truncate) what a stale name leads to
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECT, 0o644)

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``: whole blocks now, shared blocks once they are complete."""
        end = offset + len(data)
        if end > self.size:
            raise ValueError(f"write of [{offset}, {end}) past the end of a {self.size}-byte file")
        with self._lock:
            self._written += len(data)
        lo, hi = -(-offset // BLOCK) * BLOCK, end // BLOCK * BLOCK
        if lo >= hi:
            self._merge(data, offset)
            return
        if offset < lo:
            self._merge(data[: lo - offset], offset)
        if hi < end:
            self._merge(data[hi - offset :], hi)
        stage = _thread_buffer("stage")
        for pos in range(lo, hi, CHUNK):
            n = min(CHUNK, hi - pos)
            stage[:n] = data[pos - offset : pos - offset + n]
            _write_all(self.fd, stage[:n], pos)

    def _merge(self, data: memoryview, offset: int) -> None:
        end = offset + len(data)
        if end == offset:
            return
        with self._lock:
            for block in range(offset // BLOCK, (end - 1) // BLOCK + 1):
                b0 = block * BLOCK
                lo, hi = max(offset, b0), min(end, b0 + BLOCK)
                buf, filled = self._partial.pop(block, None) or (bytearray(BLOCK), 0)
                buf[lo - b0 : hi - b0] = data[lo - offset : hi - offset]
                filled += hi - lo
                if filled < min(BLOCK, self.size - b0):
                    self._partial[block] = (buf, filled)
                    continue
                self._block[:] = buf  # the last block of the file is written padded, then trimmed
                _write_all(self.fd, self._block, b0)

    def finish(self) -> None:
        """All bytes written: trim the padding of the last block and fsync."""
        if self._partial:
            block = min(self._partial)
            raise OSError(errno.EIO, f"block at byte {block * BLOCK} incomplete ({len(self._partial)} blocks)")
        if self._written != self.size:
            raise OSError(errno.EIO, f"{self._written} of {self.size} bytes written")
        if self.size % BLOCK:
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_chunks(path: Path, start: int, nbytes: int) -> Iterator[tuple[int, memoryview]]:
    """``(offset, view)`` pieces of ``[start, start + nbytes)`` of ``path``, read with ``O_DIRECT``
    (one such read at a time per thread: they share the thread's buffer)."""
    if getattr(_local, "reading", False):
        raise RuntimeError("read_chunks: another read of this thread is still open")
    buf = _thread_buffer("read")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    _local.reading = True
    try:
        pos, end = start, start + nbytes
        while pos < end:
            a0 = pos - pos % BLOCK
            a1 = min(-(-end // BLOCK) * BLOCK, a0 + CHUNK)
            got = os.preadv(fd, [buf[: a1 - a0]], a0)
            n = min(end, a0 + got) - pos
            if n <= 0:
                raise OSError(errno.EIO, f"{path.name} ended at byte {a0 + got}, before {end}")
            yield pos, buf[pos - a0 : pos - a0 + n]
            pos += n
    finally:
        _local.reading = False
        os.close(fd)


def refusal(directory: Path, sample: Path | None = None) -> str | None:
    """Why files in ``directory`` (or ``sample``, a file to read) refuse ``O_DIRECT``; None if they
    accept it (a block written, padded and trimmed, and one read)."""
    probe = directory / ".nvfp4-convert-direct-probe"
    try:
        out = DirectFile(probe, BLOCK + 1)
        try:
            out.pwrite(memoryview(bytes(BLOCK + 1)), 0)
            out.finish()
        finally:
            out.close()
        if sample is not None:
            for _ in read_chunks(sample, 0, min(BLOCK, sample.stat().st_size)):
                pass
        return None
    except OSError as e:
        return f"{e.filename or sample or directory}: {e.strerror or e}"
    finally:
        probe.unlink(missing_ok=True)
