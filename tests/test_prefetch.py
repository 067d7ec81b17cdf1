"""Prefetch: while ``run`` imports torch and plans, the source's shards are read into the page cache, headers first,
each byte once, within a budget, never through a symlink; the copies then read those bytes from there
(``ReadAhead(probe_cache=True)``) and the output is byte for byte what a run without it writes. The oracle for
"in the page cache" is the kernel's own ``mincore`` (``direct_io.cached_fraction``) after ``POSIX_FADV_DONTNEED``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_FIXTURE
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.direct_io import cached_fraction
from nvfp4_convert.prefetch import Prefetch, shard_files


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cold_copy(tmp_path: Path) -> tuple[Path, list[Path]]:
    src = tmp_path / "src"
    shutil.copytree(REPO_FIXTURE, src)
    shards = sorted(src.glob("*.safetensors"))
    for shard in shards:
        _evict(shard)
        assert cached_fraction(shard) < 0.5
    return src, shards


def test_the_cli_imports_no_torch_until_a_command_needs_it():
    """``--help`` answers at once, and ``run`` starts reading the source before torch is imported."""
    code = "import sys, nvfp4_convert.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_shard_is_read_into_the_page_cache_once(tmp_path):
    src, shards = _cold_copy(tmp_path)
    warm = Prefetch.start(src)
    warm.wait()
    assert all(cached_fraction(s) == 1.0 for s in shards)
    summary, total = warm.summary(), sum(s.stat().st_size for s in shards)
    assert summary["files"] == 3 and summary["bytes_read"] > 0
    # each byte once: read, or found in the page cache (the kernel's own read-ahead after a header, say)
    assert summary["bytes_read"] + summary["bytes_already_cached"] == total
    again = Prefetch.start(src)  # a warm source: nothing read, every chunk found in the page cache
    again.wait()
    assert again.summary()["bytes_read"] == 0 and again.summary()["bytes_already_cached"] == total


def test_it_reads_the_headers_first_and_stops_at_its_budget(tmp_path):
    src, shards = _cold_copy(tmp_path)
    warm = Prefetch(shard_files(src), budget=1)  # spent by the first header: no data read
    warm.wait()
    headers = [8 + int.from_bytes(s.read_bytes()[:8], "little") for s in shards]  # safetensors: u64 length + JSON
    summary = warm.summary()
    assert summary["bytes_read"] > 0 and summary["bytes_read"] + summary["bytes_already_cached"] == sum(headers)


def test_only_regular_shards_directly_in_src_are_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x" * 100)
    (src / "model-00001-of-00002.safetensors").write_bytes(b"y" * 100)
    (src / "model-00002-of-00002.safetensors").symlink_to(outside)
    (src / "notes.txt").write_text("not a shard")
    (src / "sub.safetensors").mkdir()
    assert shard_files(src) == [src / "model-00001-of-00002.safetensors"]
    assert shard_files(tmp_path / "missing") == []
    warm = Prefetch.start(src)  # 8 bytes of "y" say a header far longer than the file: read up to its end, no more
    warm.wait()
    assert warm.summary()["bytes_read"] + warm.summary()["bytes_already_cached"] == 100


def test_stop_ends_it(tmp_path):
    src, _ = _cold_copy(tmp_path)
    warm = Prefetch.start(src)
    warm.stop()
    assert not warm._thread.is_alive()
    assert warm.summary()["bytes_read"] <= sum(s.stat().st_size for s in shard_files(src))


def _outputs(dst: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file() and "report" not in p.name}


def test_a_run_reads_what_was_prefetched_from_the_page_cache_and_writes_the_same_bytes(tmp_path):
    src, _ = _cold_copy(tmp_path)
    args = ["--quiet", "--workers", "1", "--shard-size", "200kB"]
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "auto"), *args])
    assert result.exit_code == 0, result.output
    timing = json.loads((tmp_path / "auto" / "nvfp4-convert-report.json").read_text())["timing"]
    assert timing["prefetch"]["files"] == 3 and timing["prefetch"]["bytes_read"] > 0
    assert timing["io"] == "direct" and timing["bytes_read_from_page_cache"] > 0
    for io in ("direct", "buffered"):
        result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / io), *args, "--io", io])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / io / "nvfp4-convert-report.json").read_text())
        assert ("prefetch" in report["timing"]) == (io == "buffered")  # direct: no page cache, as asked
        assert _outputs(tmp_path / io) == _outputs(tmp_path / "auto")


def test_a_fifo_named_like_a_shard_never_blocks_it(tmp_path):
    """A ``*.safetensors`` that is a FIFO (swapped in after the listing, say) is not read and does not hang stop()."""
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "model-00001-of-00001.safetensors")
    warm = Prefetch([src / "model-00001-of-00001.safetensors"], budget=1 << 30)  # as if listed before the swap
    warm.stop()
    assert not warm._thread.is_alive() and warm.summary()["bytes_read"] == 0
