"""Crash safety: SIGKILL at many points, ``--resume``, and the result is byte-identical to an
uninterrupted run; SRC never changes; an interrupted DST is recognisably unfinished."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_FIXTURE

from nvfp4_convert.report import REPORT_JSON
from nvfp4_convert.state import dst_status

DRIVER = Path(__file__).with_name("kill_driver.py")
SHARD_BYTES = 150_000  # ~10 shards from the 1.2 MB fixture
# Spread over the run (111 write steps: converted tensors and copy runs): mid-shard, after a shard
# is renamed but before its journal line, and between the metadata files written at the end.
POINTS = [f"tensor:{k}" for k in (1, 15, 35, 55, 75, 95, 110)] + [
    "journal:1",
    "journal:5",
    "meta:1",
    "meta:3",
    "meta:5",
]


def _drive(dst: Path, point: str, resume: bool, io: str = "auto") -> int:
    cmd = [
        sys.executable,
        str(DRIVER),
        str(REPO_FIXTURE),
        str(dst),
        str(SHARD_BYTES),
        point,
        "1" if resume else "0",
        io,
    ]
    return subprocess.run(cmd, capture_output=True, timeout=300).returncode


def _digest(dst: Path) -> dict[str, str]:
    out = {}
    for p in sorted(dst.iterdir()):
        if p.name == REPORT_JSON:
            report = json.loads(p.read_text())
            report.pop("timing")
            report.pop("destination")
            out[p.name] = json.dumps(report, sort_keys=True)
        elif p.is_file():
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _src_digest() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in REPO_FIXTURE.iterdir()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    dst = tmp_path_factory.mktemp("ref") / "out"
    assert _drive(dst, "none", False) == 0
    digest = _digest(dst)
    assert sum(name.endswith(".safetensors") for name in digest) >= 8
    return digest


@pytest.mark.parametrize("point", POINTS)
def test_kill_then_resume_gives_identical_bytes(tmp_path, reference, point):
    before = _src_digest()
    dst = tmp_path / "out"
    assert _drive(dst, point, False) == -9  # really killed
    assert dst_status(dst) == "unfinished"
    assert not (dst / REPORT_JSON).exists()
    assert _drive(dst, "none", True) == 0
    assert dst_status(dst) == "finished"
    assert _digest(dst) == reference
    assert _src_digest() == before


def test_repeated_kills_on_one_destination(tmp_path, reference):
    dst = tmp_path / "out"
    assert _drive(dst, "tensor:40", False) == -9
    for point in ("tensor:20", "journal:2", "tensor:10", "meta:2"):
        assert _drive(dst, point, True) == -9
        assert dst_status(dst) == "unfinished"
    assert _drive(dst, "none", True) == 0
    assert _digest(dst) == reference


@pytest.mark.parametrize("point", ["tensor:55", "journal:5"])
def test_kill_then_resume_with_buffered_io_gives_identical_bytes(tmp_path, reference, point):
    """The points above run with direct I/O (this filesystem accepts it); the page-cache path too."""
    dst = tmp_path / "out"
    assert _drive(dst, point, False, "buffered") == -9
    assert dst_status(dst) == "unfinished"
    assert _drive(dst, "none", True, "buffered") == 0
    assert _digest(dst) == reference
