"""A source folder from anywhere: only SRC's own regular files are read, and DST is never SRC in disguise.

- index entries that are not plain file names are refused before any shard is opened;
- FIFOs (and other special files) are refused by name, never opened (a read would block forever);
- JSON files larger than the limit are refused; subfolders are reported as not carried over;
- DST equal to SRC or inside it is refused whatever path names it: a symlinked parent, ``..``, a bind mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_FIXTURE

from nvfp4_convert import checkpoint
from nvfp4_convert.checkpoint import INDEX_NAME, Checkpoint, is_plain_name
from nvfp4_convert.convert import is_same_or_inside, prepare, run
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.policy import Policy

pytestmark = pytest.mark.usefixtures("src_unchanged")  # every SRC the tool opened is unchanged afterwards


@pytest.fixture
def src(tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(REPO_FIXTURE, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _edit_index(src: Path, edit) -> None:
    idx = json.loads((src / INDEX_NAME).read_text())
    edit(idx["weight_map"])
    (src / INDEX_NAME).write_text(json.dumps(idx))


@pytest.mark.parametrize(
    "entry", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "", "a\\b", 7, None]
)
def test_an_index_entry_that_is_not_a_plain_file_name_is_refused_before_anything_is_opened(src, entry):
    first = next(iter(json.loads((src / INDEX_NAME).read_text())["weight_map"]))
    _edit_index(src, lambda wm: wm.__setitem__(first, entry))
    with pytest.raises(ConvertError, match="not a plain file name") as e:
        Checkpoint.open(src)
    assert first in str(e.value) and INDEX_NAME in str(e.value)


def test_plain_names():
    assert is_plain_name("model-00001-of-00003.safetensors")
    assert not any(is_plain_name(n) for n in ("a/b", "..", ".", "", "x\x00y", 3, ["a"]))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _plan_in_subprocess(src: Path) -> subprocess.CompletedProcess:
    """A FIFO opened for reading blocks forever: run in a child with a timeout, so a regression fails, not hangs."""
    return subprocess.run(
        [sys.executable, "-m", "nvfp4_convert", "plan", str(src)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("which", ["model-00002-of-00003.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_in_the_source_is_refused_by_name_never_read(src, which):
    (src / which).unlink(missing_ok=True)
    os.mkfifo(src / which)
    before = _digest(src)
    proc = _plan_in_subprocess(src)
    assert _digest(src) == before
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is a FIFO: refused" in proc.stderr and which in proc.stderr


def test_a_huge_json_file_is_refused(src, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_JSON_BYTES", 1000)
    with pytest.raises(ConvertError, match="larger than the"):
        Checkpoint.open(src)


def test_subfolders_are_reported_as_not_carried_over(src):
    (src / "inference").mkdir()
    (src / "inference" / "model.py").write_text("# the release's code\n")
    plan = prepare(src, Policy()).plan
    assert any("subfolder inference" in n and "not carried over" in n for n in plan.notes), plan.notes


def test_dst_is_src_whatever_path_names_it(tmp_path, src):
    link = tmp_path / "link-to-src"
    link.symlink_to(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert is_same_or_inside(src, src)
    assert is_same_or_inside(link, src)  # a symlink to SRC
    assert is_same_or_inside(link / "out", src)  # below SRC through a symlinked parent
    assert is_same_or_inside(elsewhere / ".." / "src" / "new" / "deeper", src)  # `..`, folders not created yet
    assert not is_same_or_inside(elsewhere / "out", src)
    assert not is_same_or_inside(src.parent / "src-converted", src)  # a sibling whose name starts like SRC


def test_dst_under_a_bind_mount_of_src_is_refused(tmp_path, src):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    try:
        assert str(mnt.resolve()) != str(src.resolve())  # path strings differ ...
        assert is_same_or_inside(mnt / "out", src)  # ... the inode does not
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _hf_cache_snapshot(root: Path) -> Path:
    """REPO_FIXTURE laid out as a Hugging Face cache: snapshots/REV/* are relative symlinks into ../../blobs/."""
    repo = root / "hub" / "models--org--tiny-dsv4"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(REPO_FIXTURE.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


def test_a_hugging_face_cache_snapshot_converts_into_real_files_and_the_links_are_reported(tmp_path):
    from nvfp4_convert.convert import run

    snap = _hf_cache_snapshot(tmp_path)
    dst = tmp_path / "out"
    report = run(snap, dst, Policy())
    assert set(report["followed_links"]) == {f.name for f in REPO_FIXTURE.iterdir()}
    assert all("/blobs/" in t for t in report["followed_links"].values())
    assert any("symlink(s) in the source followed" in n for n in report["notes"])
    files = list(dst.iterdir())
    assert files and not any(p.is_symlink() for p in files)  # real files (or hard links), never a symlink
    from nvfp4_convert.verify import verify

    result = verify(dst, source=snap)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:3]


def test_a_symlink_leaving_the_source_is_refused_by_name_unless_allowed(tmp_path, src):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "tokenizer.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(ConvertError, match="outside the source folder: refused") as e:
        Checkpoint.open(src)
    assert "tokenizer.json" in str(e.value)
    ckpt = Checkpoint.open(src, allow_outside_links=True)
    assert ckpt.links == {"tokenizer.json": str((outside / "tokenizer.json").resolve())}


def test_verify_follows_outside_links_only_when_told_as_run_was(tmp_path, src):
    from nvfp4_convert.verify import verify

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "tokenizer.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    dst = tmp_path / "out"
    run(src, dst, Policy(), allow_outside_links=True)
    with pytest.raises(ConvertError, match="outside the source folder: refused"):
        verify(dst, source=src)  # the report's word is not enough: the user says it again
    result = verify(dst, source=src, allow_outside_links=True)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:3]


def test_a_shard_linked_from_outside_is_refused_before_it_is_opened(tmp_path, src):
    shard = src / "model-00001-of-00003.safetensors"
    moved = tmp_path / "moved.safetensors"
    shard.rename(moved)
    shard.symlink_to(moved)
    with pytest.raises(ConvertError, match="outside the source folder"):
        Checkpoint.open(src)


def test_a_partial_file_in_the_source_is_never_opened_for_writing(tmp_path, src):
    """A SRC holding ``nvfp4-convert-report.json.partial`` (or any ``*.partial``): carrying it over as a hard link
    would make our temporary file SRC's inode; it is not carried over, and temp files are created anew anyway."""
    from nvfp4_convert.convert import run

    bait = src / "nvfp4-convert-report.json.partial"
    bait.write_text("the user's own data\n")
    report = run(src, tmp_path / "dst", Policy())
    assert bait.read_text() == "the user's own data\n"
    assert any("temporary file nvfp4-convert-report.json.partial" in n for n in report["notes"])


def test_temporary_files_are_created_anew_never_through_a_link(tmp_path):
    from nvfp4_convert.safetensors_io import write_file_atomic

    precious = tmp_path / "precious"
    precious.write_text("keep")
    out = tmp_path / "out.json"
    (tmp_path / "out.json.partial").symlink_to(precious)
    write_file_atomic(out, b"{}")
    os.link(precious, tmp_path / "again.json.partial")
    write_file_atomic(tmp_path / "again.json", b"{}")
    assert precious.read_text() == "keep" and out.read_bytes() == b"{}"


def test_a_cache_whose_blobs_folder_is_a_link_elsewhere_is_not_trusted(tmp_path):
    """``blobs -> /somewhere`` would make any file there look like a cache blob: only a real blobs/ folder is."""
    snap = _hf_cache_snapshot(tmp_path)
    blobs = snap.parent.parent / "blobs"
    elsewhere = tmp_path / "elsewhere"
    blobs.rename(elsewhere)
    blobs.symlink_to(elsewhere)
    with pytest.raises(ConvertError, match="outside the source folder: refused"):
        Checkpoint.open(snap)


def test_a_link_into_blobs_that_is_not_a_blob_is_refused(tmp_path):
    snap = _hf_cache_snapshot(tmp_path)
    blobs = snap.parent.parent / "blobs"
    (blobs / "not-a-hash").write_text("{}")
    (snap / "extra.json").symlink_to(Path("..") / ".." / "blobs" / "not-a-hash")
    with pytest.raises(ConvertError, match="outside the source folder: refused"):
        Checkpoint.open(snap)


def test_a_symlink_loop_is_one_line(src):
    (src / "loop.json").symlink_to(src / "loop.json")
    with pytest.raises(ConvertError, match="does not resolve"):
        Checkpoint.open(src)


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000 + b"]" * 100_000, b'{"model_type": "deepseek_v4", "x": 1' + b"9" * 5000 + b"}", b"\xff\xfe{}"],
    ids=["deep nesting", "5000-digit integer", "not UTF-8"],
)
def test_hostile_json_is_one_line_naming_the_file(src, content):
    (src / "config.json").write_bytes(content)
    with pytest.raises(ConvertError, match=r"invalid JSON|not a JSON object") as e:
        Checkpoint.open(src)
    assert "config.json" in str(e.value)
