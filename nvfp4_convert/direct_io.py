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
- ``ReadAhead(ranges)`` reads a list of ranges, of any number of files, in order on a background
  thread, one ``CHUNK`` ahead of its consumer: the disk keeps reading while the consumer writes,
  across range and file boundaries. Files in ``cached`` are read through the page cache (they are
  there: a copy from memory), the others with ``O_DIRECT``; with ``probe_cache``, each chunk of those whose
  pages are all in the page cache already (``in_page_cache``: read there by ``prefetch``, say) is read from
  there, not again from the disk (a chunk only partly there is read with ``O_DIRECT`` whole). The bytes are the same either way; ``cached_bytes`` counts
  those read through the page cache.
- ``differences(left, right)`` compares two lists of equally long ranges, both read ahead at once
  (two threads), and yields where they differ: ``verify``'s byte comparison at the disk's speed.
- ``cached_fraction(path)`` is the share of a file's pages in the page cache, ``in_page_cache(fd, start, end)``
  whether all of a span's are (``mincore``: nothing is read); ``read_from_cache`` picks, of a set of files, those a
  ``ReadAhead`` should read wholly through the page cache.
- ``refusal(directory, sample)`` says why a filesystem refuses ``O_DIRECT`` (None: it accepts it).

Memory: one read buffer and one staging buffer of ``CHUNK`` bytes per thread that uses them, two
per ``ReadAhead``, plus one ``BLOCK`` per incomplete block.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 4096  # file-offset and length alignment: the page size, so no page is shared by two writes
CHUNK = 64 * 1024 * 1024  # bytes per direct read or write: large sequential requests
# Share of a file's pages in the page cache from which it is read wholly from there. All of them: of a file partly
# there (a prefetch stopped half way), ``ReadAhead(probe_cache=True)`` takes the chunks there from there and reads
# the rest with O_DIRECT, which a buffered read of the whole file would not (BENCHMARKS.md, run F).
CACHED_ENOUGH = 1.0

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
        self.write_seconds = 0.0  # in pwrite calls, summed over the threads writing
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
        t = time.perf_counter()
        for pos in range(lo, hi, CHUNK):
            n = min(CHUNK, hi - pos)
            stage[:n] = data[pos - offset : pos - offset + n]
            _write_all(self.fd, stage[:n], pos)
        with self._lock:
            self.write_seconds += time.perf_counter() - t

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
            lo, n = _read_aligned(fd, buf, pos, end, path)
            yield pos, buf[lo : lo + n]
            pos += n
    finally:
        _local.reading = False
        os.close(fd)


def _aligned_span(pos: int, end: int, nbytes: int) -> tuple[int, int]:
    """The ``BLOCK``-aligned span of at most ``nbytes`` that one read from ``pos`` towards ``end`` covers."""
    a0 = pos - pos % BLOCK
    return a0, min(-(-end // BLOCK) * BLOCK, a0 + nbytes)


def _read_aligned(fd: int, buf: memoryview, pos: int, end: int, path: Path) -> tuple[int, int]:
    """One read of ``buf``'s length at most, from the block holding ``pos`` (aligned for ``O_DIRECT``):
    ``(lo, n)``, the bytes ``[pos, pos + n)`` of the file being ``buf[lo : lo + n]``."""
    a0, a1 = _aligned_span(pos, end, len(buf))
    got = os.preadv(fd, [buf[: a1 - a0]], a0)
    n = min(end, a0 + got) - pos
    if n <= 0:
        raise OSError(errno.EIO, f"{path.name} ended at byte {a0 + got}, before {end}")
    return pos - a0, n


@dataclass(frozen=True)
class Range:
    """``nbytes`` bytes of ``path`` from ``start``."""

    path: Path
    start: int
    nbytes: int


class ReadAhead:
    """Read ``ranges`` in order on a background thread, one ``CHUNK`` ahead (see module doc).

    ``chunks(i)`` yields ``(offset, view)`` pieces covering range ``i``; ranges are taken in order,
    each whole, and a view is valid until the next piece is asked for. ``read_seconds`` is the
    time the thread spent in reads. Use as a context manager: leaving it stops the thread.
    """

    def __init__(
        self,
        ranges: Sequence[Range],
        *,
        cached: frozenset[Path] = frozenset(),
        probe_cache: bool = False,
        depth: int = 2,
        chunk: int | None = None,
    ) -> None:
        self.ranges = list(ranges)
        self.cached = cached
        self.probe_cache = probe_cache
        self.read_seconds = 0.0
        self.cached_bytes = 0
        self._free: queue.Queue[memoryview | None] = queue.Queue()
        for _ in range(depth):  # the buffers' size is the size of each read: ``chunk``, a multiple of BLOCK
            self._free.put(memoryview(mmap.mmap(-1, chunk or CHUNK)))
        self._full: queue.Queue[tuple[int, memoryview, int, int] | BaseException | None] = queue.Queue()
        self._next = 0
        self._stop = False
        self._thread = threading.Thread(target=self._read_all, name="read-ahead", daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        try:
            for r in self.ranges:
                whole = r.path in self.cached
                fd = os.open(r.path, os.O_RDONLY | (0 if whole else os.O_DIRECT))
                buffered = fd if whole else -1  # opened for the first chunk found in the page cache
                try:
                    pos, end = r.start, r.start + r.nbytes
                    while pos < end:
                        buf = self._free.get()
                        if buf is None or self._stop:
                            return
                        t = time.perf_counter()
                        use = fd
                        if whole or (self.probe_cache and in_page_cache(fd, *_aligned_span(pos, end, len(buf)))):
                            if buffered < 0:
                                buffered = os.open(r.path, os.O_RDONLY)
                            use = buffered
                        lo, n = _read_aligned(use, buf, pos, end, r.path)
                        self.read_seconds += time.perf_counter() - t
                        self.cached_bytes += n if use == buffered else 0
                        self._full.put((pos, buf, lo, n))
                        pos += n
                finally:
                    os.close(fd)
                    if buffered not in (-1, fd):
                        os.close(buffered)
        except BaseException as e:  # handed to the consumer, raised there
            self._full.put(e)

    def chunks(self, i: int) -> Iterator[tuple[int, memoryview]]:
        if i != self._next:
            raise RuntimeError(f"ReadAhead: range {i} asked for, range {self._next} is next")
        self._next += 1
        r = self.ranges[i]
        pos, end = r.start, r.start + r.nbytes
        while pos < end:
            item = self._full.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                raise RuntimeError("ReadAhead stopped")
            got, buf, lo, n = item
            if got != pos:
                raise RuntimeError(f"ReadAhead: byte {got} read, byte {pos} expected")
            try:
                yield pos, buf[lo : lo + n]
            finally:
                self._free.put(buf)
            pos += n

    def close(self) -> None:
        self._stop = True
        self._free.put(None)  # wakes the thread if it waits for a buffer
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def differences(
    left: Sequence[Range], right: Sequence[Range], *, cached: frozenset[Path] = frozenset()
) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, offsets)`` for each piece where range ``i`` of ``left`` and of ``right`` differ: the
    offsets (from the range's start) of the differing bytes. Both sides are read ahead at once."""
    if [r.nbytes for r in left] != [r.nbytes for r in right]:
        raise ValueError("differences: ranges of different lengths")
    chunk = max(BLOCK, CHUNK // 4)  # two sides, two buffers each: 64 MiB in all, still long sequential reads
    with ReadAhead(left, cached=cached, chunk=chunk) as a, ReadAhead(right, cached=cached, chunk=chunk) as b:
        for i, r in enumerate(left):
            xs, ys = a.chunks(i), b.chunks(i)
            x = y = memoryview(b"")
            done = 0
            while done < r.nbytes:
                if not x:
                    x = next(xs)[1]
                if not y:
                    y = next(ys)[1]
                n = min(len(x), len(y))
                if not _same(x[:n], y[:n]):
                    differ = np.frombuffer(x[:n], np.uint8) != np.frombuffer(y[:n], np.uint8)
                    yield i, np.flatnonzero(differ) + done
                x, y, done = x[n:], y[n:], done + n
            for _ in xs:  # exhausted: hands the last buffers back
                pass
            for _ in ys:
                pass


def _same(x: memoryview, y: memoryview) -> bool:
    """Equal bytes (libc ``memcmp`` on the buffers, ~10x faster than comparing memoryviews)."""
    if x.readonly or y.readonly or not x:
        return x == y
    libc = _libc()
    return (
        libc.memcmp(
            ctypes.addressof(ctypes.c_char.from_buffer(x)), ctypes.addressof(ctypes.c_char.from_buffer(y)), len(x)
        )
        == 0
    )


_PROT_READ, _MAP_SHARED = 1, 1
_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.memcmp.restype = ctypes.c_int
    libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return libc


def read_from_cache(files: Iterable[Path]) -> frozenset[Path]:
    """The ``files`` best read through the page cache: wholly there already (``CACHED_ENOUGH``), or refusing
    ``O_DIRECT``. The others are read with ``O_DIRECT`` (``ReadAhead``'s ``cached``)."""
    return frozenset(f for f in files if cached_fraction(f) >= CACHED_ENOUGH or not reads_direct(f))


def cached_fraction(path: Path) -> float:
    """The share of ``path``'s pages that are in the page cache (``mincore``: nothing is read). 0.0 where it cannot
    be told (an empty file, no ``mincore``)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    window = 1 << 30  # mapped a GiB at a time
    resident = 0
    with open(path, "rb") as f:
        for off in range(0, size, window):
            counted = _resident_pages(f.fileno(), off, min(size, off + window))
            if counted is None:
                return 0.0
            resident += counted[0]
    return resident / -(-size // mmap.PAGESIZE)


def in_page_cache(fd: int, start: int, end: int) -> bool:
    """Whether every page of ``[start, end)`` of ``fd`` is in the page cache (False where it cannot be told)."""
    if end <= start:
        return True
    counted = _resident_pages(fd, start, end)
    return counted is not None and counted[0] == counted[1]


def mincore_tells(fd: int) -> bool:
    """Whether ``mincore`` tells this process the truth about ``fd``'s pages. Since Linux 5.2 it does only for root,
    the file's owner, or a process that may write to the file; to anyone else it says every page is there (so that
    one user cannot watch another's reads), which would make every chunk look cached."""
    euid = os.geteuid()
    return euid == 0 or os.fstat(fd).st_uid == euid or os.access(f"/proc/self/fd/{fd}", os.W_OK)


def _resident_pages(fd: int, start: int, end: int) -> tuple[int, int] | None:
    """``(resident, pages)``: how many of the ``pages`` holding ``[start, end)`` of ``fd`` are in the page cache
    (``mincore`` on a read-only mapping of them), ``None`` where it cannot be told (no ``mincore``, a file that cannot be mapped, a file whose
    residency the kernel does not reveal to this process: ``mincore_tells``)."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    if not mincore_tells(fd):
        return None
    page = mmap.PAGESIZE
    a0 = start - start % page
    length = end - a0
    pages = -(-length // page)
    addr = libc.mmap(None, length, _PROT_READ, _MAP_SHARED, fd, a0)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(addr, length, vec) != 0:
            return None
        return int(np.count_nonzero(np.frombuffer(vec, np.uint8, count=pages) & 1)), pages
    finally:
        libc.munmap(addr, length)


def reads_direct(path: Path) -> bool:
    """Whether ``path`` can be read with ``O_DIRECT`` (one block read; nothing written)."""
    try:
        for _ in read_chunks(path, 0, min(BLOCK, path.stat().st_size)):
            pass
        return True
    except OSError:
        return False


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
