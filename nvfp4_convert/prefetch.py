"""Read the source into the page cache while ``run`` starts, so the disk is not idle while torch is imported.

``run`` spends its first seconds importing torch and planning (~3 s on the VM of BENCHMARKS.md, a tenth of
copying one DeepSeek-V4-Pro layer) before it reads a byte of tensor data. ``Prefetch.start(src)`` reads on a
background thread meanwhile, through the page cache: first every shard's header region (which planning reads
next), then the shards' bytes in name order (the order the copies read them, near enough), until ``stop()`` (the
plan is made) or a budget of a quarter of the free memory (headers aside). ``direct_io.ReadAhead`` then reads every chunk found
wholly in the page cache from there and the rest with ``O_DIRECT``: nothing is read twice from the disk, and the
bytes written are the same whatever was prefetched (``tests/test_prefetch.py``).

Best effort and harmless: it reads and never parses. Only regular ``*.safetensors`` files directly in SRC, opened
with ``O_NOFOLLOW`` (a symlink is left to planning's checks); a header region is what the first 8 bytes say,
capped at the file's size and ``HEADER_CAP``; chunks already in the page cache are skipped (a warm source costs a
``mincore`` per chunk); any error ends the thread quietly (planning reports the file properly). Imports neither
torch nor anything that does: the CLI starts it before torch is imported.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import threading
import time
from pathlib import Path

from .direct_io import in_page_cache

CHUNK = 16 * 1024 * 1024  # bytes per read: long sequential reads, and a prompt stop()
# Chunks asked for (POSIX_FADV_WILLNEED) ahead of the one read: the disk has several requests at once, and keeps
# reading while this thread waits for the GIL (importing torch holds it for long stretches). Not more: planning's own
# small reads (the experts' global scales) queue behind them (32 ahead made the runs slower: BENCHMARKS.md, run F).
AHEAD = 4
HEADER_CAP = 100 * 1024 * 1024  # a header region is read ahead up to this (safetensors allows 100 MB)
STOP_WAIT_S = 5.0  # stop() waits this long for the read under way (a daemon thread: never holds the exit)


def shard_files(src: Path) -> list[Path]:
    """The regular (not symlinked) ``*.safetensors`` files directly in ``src``, by name; none if it cannot be read."""
    try:
        with os.scandir(src) as entries:
            return sorted(
                Path(e.path) for e in entries if e.name.endswith(".safetensors") and e.is_file(follow_symlinks=False)
            )
    except OSError:
        return []


def free_memory() -> int:
    """Bytes of free memory (not counting the page cache), 0 where it cannot be told."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


class Prefetch:
    """A background read of ``files`` into the page cache, at most ``budget`` bytes from the disk (see module doc)."""

    def __init__(self, files: list[Path], budget: int) -> None:
        self.files = files
        self.budget = budget
        self.read_bytes = 0  # read from the disk into the page cache
        self.skipped_bytes = 0  # found there already
        self.seconds = 0.0
        self._stop = threading.Event()
        self._buf = memoryview(mmap.mmap(-1, CHUNK))
        self._thread = threading.Thread(target=self._read_all, name="prefetch", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, src: Path) -> Prefetch:
        return cls(shard_files(src), free_memory() // 4)

    def stop(self) -> None:
        """Stop reading (after the read under way: at most ``CHUNK``) and wait for the thread."""
        self._stop.set()
        self._thread.join(STOP_WAIT_S)

    def wait(self) -> None:
        """Wait until it has read all it will (every file, or the budget)."""
        self._thread.join()

    def summary(self) -> dict:
        return {
            "bytes_read": self.read_bytes,
            "bytes_already_cached": self.skipped_bytes,
            "seconds": round(self.seconds, 3),
            "files": len(self.files),
        }

    def _read_all(self) -> None:
        t0 = time.monotonic()
        fds: list[int] = []
        try:
            for path in self.files:  # non-blocking: a FIFO swapped in since the listing never blocks the open
                fds.append(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
                if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
                    return
            sizes = [os.fstat(fd).st_size for fd in fds]
            headers = []
            for fd, size in zip(fds, sizes, strict=True):  # the headers first: planning reads every one of them next
                head = os.pread(fd, 8, 0)
                end = min(8 + struct.unpack("<Q", head)[0], HEADER_CAP, size) if len(head) == 8 else 0
                if not self._read(fd, 0, end, budgeted=False):
                    return
                headers.append(end)
            for fd, start, size in zip(fds, headers, sizes, strict=True):
                if not self._read(fd, start, size):
                    return
        except Exception:  # best effort: planning reads the same files and names what is wrong
            return
        finally:
            for fd in fds:
                os.close(fd)
            self.seconds = time.monotonic() - t0

    def _read(self, fd: int, start: int, end: int, *, budgeted: bool = True) -> bool:
        """Bring ``[start, end)`` of ``fd`` (``end`` at most its size) into the page cache; False once stopped or
        (``budgeted``) the budget is spent. Headers are read whatever the budget: planning reads them next anyway.

        The kernel is asked for the next ``AHEAD`` chunks (``POSIX_FADV_WILLNEED``) while one is read: a single
        reader got ~0.8 GB/s on the VM of BENCHMARKS.md, 1.1-1.9 GB/s with 4 chunks asked for ahead. A chunk wholly
        in the page cache before it was asked for is skipped (counted as already cached)."""
        there_before: dict[int, bool] = {}  # chunk start -> in the page cache before it was asked for

        def ask(pos: int) -> None:
            if pos < end and pos not in there_before:
                n = min(CHUNK, end - pos)
                there_before[pos] = in_page_cache(fd, pos, pos + n)
                if not there_before[pos]:
                    os.posix_fadvise(fd, pos, n, os.POSIX_FADV_WILLNEED)

        for pos in range(start, end, CHUNK):
            if self._stop.is_set() or (budgeted and self.read_bytes >= self.budget):
                return False
            for k in range(AHEAD + 1):
                ask(pos + k * CHUNK)
            n = min(CHUNK, end - pos)
            if there_before.pop(pos):
                self.skipped_bytes += n
                continue
            got = os.preadv(fd, [self._buf[:n]], pos)  # waits for the chunk: the pace of the disk
            self.read_bytes += got
            if got < n:  # the file is shorter than it said: leave it to planning
                return True
        return True
