"""Direct I/O: a file written with ``O_DIRECT`` in pieces of any size, at any offset, in any order,
from several threads, holds exactly the bytes written; ranges read back with ``O_DIRECT`` are the
file's bytes. The oracle is plain Python ``bytes`` slicing and buffered reads of the same file."""

from __future__ import annotations

import itertools
import os
import random
import threading

import pytest

from nvfp4_convert import direct_io
from nvfp4_convert.direct_io import BLOCK, DirectFile, Range, ReadAhead, read_chunks


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of a few blocks, so that small files cross many chunk boundaries."""
    monkeypatch.setattr(direct_io, "CHUNK", 3 * BLOCK)
    monkeypatch.setattr(direct_io, "_local", threading.local())  # buffers sized for the small chunk


def _pieces(size: int, rng: random.Random, cuts: int) -> list[tuple[int, int]]:
    """Cut [0, size) at ``cuts`` random points: few cuts give pieces of several chunks, many give
    pieces of a few bytes to a few blocks."""
    points = sorted({0, size, *(rng.randrange(size) for _ in range(cuts))})
    return list(itertools.pairwise(points))


@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK, BLOCK + 1, 7 * BLOCK + 123, 40_000, 100_003])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("cuts", ["few", "many"])
def test_pieces_in_any_order_from_any_thread_give_the_exact_file(tmp_path, monkeypatch, size, threads, cuts):
    rng = random.Random(size * 10 + threads)
    data = rng.randbytes(size)
    pieces = _pieces(size, rng, 3 if cuts == "few" else size // 500)
    rng.shuffle(pieces)
    whole_blocks = []
    real_write_all = direct_io._write_all

    def write_all(fd: int, view: memoryview, offset: int) -> None:
        whole_blocks.append(len(view))
        real_write_all(fd, view, offset)

    monkeypatch.setattr(direct_io, "_write_all", write_all)
    path = tmp_path / "f.bin"
    out = DirectFile(path, size)

    def write(share: list[tuple[int, int]]) -> None:
        for a, b in share:
            out.pwrite(memoryview(data)[a:b], a)

    workers = [threading.Thread(target=write, args=(pieces[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.finish()
    out.close()
    assert path.read_bytes() == data
    if cuts == "few" and size > 40 * BLOCK // 4:  # large pieces went out in chunk-sized requests
        assert max(whole_blocks) == direct_io.CHUNK


def test_finish_refuses_a_file_with_a_hole(tmp_path):
    out = DirectFile(tmp_path / "f.bin", 3 * BLOCK)
    out.pwrite(memoryview(bytes(BLOCK + 10)), 0)
    out.pwrite(memoryview(bytes(BLOCK)), 2 * BLOCK)
    with pytest.raises(OSError, match=f"block at byte {BLOCK} incomplete"):
        out.finish()
    out.close()


def test_finish_refuses_a_file_with_a_block_never_written(tmp_path):
    out = DirectFile(tmp_path / "f.bin", 3 * BLOCK + 10)
    out.pwrite(memoryview(bytes(BLOCK)), 0)
    out.pwrite(memoryview(bytes(BLOCK + 10)), 2 * BLOCK)
    with pytest.raises(OSError, match=f"{2 * BLOCK + 10} of {3 * BLOCK + 10} bytes written"):
        out.finish()
    out.close()


def test_one_read_at_a_time_per_thread(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(3 * BLOCK))
    first = read_chunks(path, 0, 3 * BLOCK)
    next(first)
    with pytest.raises(RuntimeError, match="still open"):
        next(read_chunks(path, 0, 10))
    first.close()
    assert len(b"".join(bytes(v) for _, v in read_chunks(path, 0, 10))) == 10


def test_writes_past_the_end_are_refused(tmp_path):
    out = DirectFile(tmp_path / "f.bin", 10)
    with pytest.raises(ValueError, match="past the end"):
        out.pwrite(memoryview(bytes(11)), 0)
    out.close()


@pytest.mark.parametrize(("start", "nbytes"), [(0, 0), (0, 1), (5, BLOCK), (BLOCK - 1, 2), (123, 50_000), (0, 60_001)])
def test_read_chunks_give_the_files_bytes_in_order(tmp_path, start, nbytes):
    data = random.Random(1).randbytes(60_001)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    got = bytearray()
    for offset, view in read_chunks(path, start, nbytes):
        assert offset == start + len(got)
        got += view
    assert bytes(got) == data[start : start + nbytes]


def test_reading_past_the_end_of_the_file_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(100))
    with pytest.raises(OSError, match="ended at byte 100"):
        list(read_chunks(path, 50, 100))


def test_this_filesystem_is_probed_without_leaving_anything(tmp_path):
    sample = tmp_path / "s.bin"
    sample.write_bytes(bytes(10))
    assert direct_io.refusal(tmp_path, sample) is None  # ext4 here; tmpfs also accepts O_DIRECT
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]


def test_a_filesystem_that_opens_but_refuses_direct_writes_is_refused_and_cleaned(tmp_path, monkeypatch):
    """tmpfs before Linux 6.6 (and some FUSE filesystems) create the file and then fail the write."""
    import errno
    import os

    def einval(*args: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", einval)
    assert direct_io.refusal(tmp_path) == f"{tmp_path}: Invalid argument"
    assert list(tmp_path.iterdir()) == []


def _evict(path, start: int = 0, nbytes: int = 0) -> None:
    """Drop ``[start, start + nbytes)`` of ``path`` (0: to the end) from the page cache (clean pages can go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _files(tmp_path, sizes: list[int]) -> dict:
    """Random files, not in the page cache: ``ReadAhead`` reads them from the disk with ``O_DIRECT``."""
    rng = random.Random(2)
    out = {}
    for i, size in enumerate(sizes):
        path = tmp_path / f"src{i}.bin"
        path.write_bytes(rng.randbytes(size))
        out[path] = path.read_bytes()
        _evict(path)
    return out


@pytest.mark.parametrize("cached", [False, True])
def test_read_ahead_gives_every_range_of_every_file_in_order(tmp_path, monkeypatch, cached):
    monkeypatch.setattr(direct_io, "CHUNK", 2 * BLOCK)  # many chunks per range
    files = _files(tmp_path, [30_001, 9_000, 4 * BLOCK])
    a, b, c = files
    ranges = [Range(a, 0, 30_001), Range(b, 17, 0), Range(b, 5, 8_000), Range(c, BLOCK - 1, 2 * BLOCK), Range(a, 7, 3)]
    with ReadAhead(ranges, cached=frozenset(files) if cached else frozenset()) as ahead:
        for i, r in enumerate(ranges):
            got = bytearray()
            for offset, view in ahead.chunks(i):
                assert offset == r.start + len(got)
                got += view
            assert bytes(got) == files[r.path][r.start : r.start + r.nbytes]
    assert ahead.read_seconds > 0
    assert ahead.cached_bytes == (30_001 + 8_000 + 2 * BLOCK + 3 if cached else 0)


def test_read_ahead_reads_the_chunks_already_in_the_page_cache_from_there(tmp_path, monkeypatch):
    """A file half in the page cache (a prefetch stopped half way): with ``probe_cache`` its chunks there are read from
    there, the rest with ``O_DIRECT``; the bytes are the file's either way."""
    monkeypatch.setattr(direct_io, "CHUNK", 4 * BLOCK)
    files = _files(tmp_path, [64 * BLOCK + 123])
    (a,) = files
    a.read_bytes()
    _evict(a, 24 * BLOCK)  # only the first 24 blocks left in the page cache (6 chunks of 4)
    fd = os.open(a, os.O_RDONLY)
    assert direct_io.in_page_cache(fd, 0, 24 * BLOCK) and not direct_io.in_page_cache(fd, 0, 25 * BLOCK)
    os.close(fd)
    with ReadAhead([Range(a, 0, len(files[a]))], probe_cache=True) as ahead:
        got = b"".join(bytes(view) for _, view in ahead.chunks(0))
    assert got == files[a]
    assert ahead.cached_bytes == 24 * BLOCK  # the other 40 blocks and the tail from the disk
    with ReadAhead([Range(a, 0, len(files[a]))]) as ahead:  # without probe_cache (--io direct): all O_DIRECT
        assert b"".join(bytes(view) for _, view in ahead.chunks(0)) == files[a]
    assert ahead.cached_bytes == 0


def test_read_ahead_takes_ranges_in_order_only(tmp_path):
    (a,) = _files(tmp_path, [100])
    with ReadAhead([Range(a, 0, 10), Range(a, 10, 10)]) as ahead, pytest.raises(RuntimeError, match="range 0 is next"):
        list(ahead.chunks(1))


def test_read_ahead_hands_a_read_error_to_the_consumer(tmp_path):
    (a,) = _files(tmp_path, [100])
    with ReadAhead([Range(a, 50, 100)]) as ahead, pytest.raises(OSError, match="ended at byte 100"):
        list(ahead.chunks(0))


def test_read_ahead_stops_when_its_consumer_gives_up(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "CHUNK", BLOCK)
    (a,) = _files(tmp_path, [64 * BLOCK])
    ahead = ReadAhead([Range(a, 0, 64 * BLOCK)])
    next(iter(ahead.chunks(0)))  # one piece taken; the thread waits for a free buffer
    ahead.close()
    assert not ahead._thread.is_alive()


def test_cached_fraction_tells_pages_in_memory_from_pages_on_disk(tmp_path):
    (a,) = _files(tmp_path, [1 << 20])
    a.read_bytes()  # read back: in the page cache
    assert direct_io.cached_fraction(a) == 1.0
    _evict(a)
    assert direct_io.cached_fraction(a) < 0.5
    (tmp_path / "empty").write_bytes(b"")
    assert direct_io.cached_fraction(tmp_path / "empty") == 0.0


def test_differences_finds_every_differing_byte_whatever_the_alignment_of_either_side(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "CHUNK", 2 * BLOCK)  # pieces of the two sides end at different places
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data = random.Random(3).randbytes(50_000)
    a.write_bytes(data)
    changed = bytearray(bytes(777) + data)  # the same bytes, 777 further on
    for k in (0, 2 * BLOCK - 1, 2 * BLOCK, 30_000, 49_999):
        changed[777 + k] ^= 0xFF
    b.write_bytes(bytes(changed))
    left = [Range(a, 0, 20_000), Range(a, 20_000, 30_000)]
    right = [Range(b, 777, 20_000), Range(b, 20_777, 30_000)]
    found = {(i, int(x)) for i, offsets in direct_io.differences(left, right) for x in offsets}
    assert found == {(0, 0), (0, 2 * BLOCK - 1), (0, 2 * BLOCK), (1, 10_000), (1, 29_999)}
    assert list(direct_io.differences(left, left)) == []
    with pytest.raises(ValueError, match="different lengths"):
        list(direct_io.differences(left, right[:1]))


def test_mincore_is_trusted_only_where_the_kernel_tells_the_truth(tmp_path, monkeypatch):
    """Linux >= 5.2 says "every page is there" to a process that neither owns the file nor may write to it (nor is
    root): such a file's residency cannot be told, so nothing is taken as cached (``None``), never all of it."""
    (a,) = _files(tmp_path, [8 * BLOCK])
    fd = os.open(a, os.O_RDONLY)
    try:
        assert direct_io.mincore_tells(fd)  # root, or the owner, here
        monkeypatch.setattr(os, "geteuid", lambda: os.fstat(fd).st_uid + 1)  # someone else ...
        monkeypatch.setattr(os, "access", lambda *a, **k: False)  # ... who may not write to it
        assert not direct_io.mincore_tells(fd)
        assert direct_io._resident_pages(fd, 0, 8 * BLOCK) is None
        assert not direct_io.in_page_cache(fd, 0, 8 * BLOCK)
    finally:
        os.close(fd)
