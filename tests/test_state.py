"""One run per DST, really: the DST lock is taken before DST's state is read, and ``--resume`` refuses a source
that changed since the run began (size, mtime or inode of a source file, as recorded in the run state); a journal
line torn by a crash is skipped (its shard redone) by the one journal reader, ``state.read_journal``."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_FIXTURE

from nvfp4_convert.convert import run
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.policy import Policy
from nvfp4_convert.state import RunState, destination_lock, dst_status, read_journal

pytestmark = pytest.mark.usefixtures("src_unchanged")  # every SRC the tool opened is unchanged afterwards

DRIVER = Path(__file__).with_name("kill_driver.py")


def test_a_held_destination_is_refused_before_its_state_is_read(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ConvertError, match="another nvfp4-convert run holds this destination"):
            run(REPO_FIXTURE, dst, Policy())
        assert dst_status(dst) == "empty"  # nothing written, not even the state directory
    finally:
        os.close(fd)
    with destination_lock(dst):  # released: the lock is the folder's, not a file's
        pass


def test_two_runs_started_together_never_both_write(tmp_path):
    dst = tmp_path / "dst"
    code = (
        "import sys; from pathlib import Path; from nvfp4_convert.convert import run; "
        "from nvfp4_convert.policy import Policy; from nvfp4_convert.errors import ConvertError\n"
        "try:\n    run(Path(sys.argv[1]), Path(sys.argv[2]), Policy()); print('WROTE')\n"
        "except ConvertError as e:\n    print('REFUSED', e)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(REPO_FIXTURE), str(dst)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    before = {p.name: p.read_bytes() for p in REPO_FIXTURE.iterdir()}
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert {p.name: p.read_bytes() for p in REPO_FIXTURE.iterdir()} == before
    assert sum("WROTE" in o for o in outs) == 1, outs
    assert all("WROTE" in o or "REFUSED" in o for o in outs), outs
    assert dst_status(dst) == "finished"


def test_resume_refuses_a_source_that_changed_since_the_run_began(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO_FIXTURE, src)
    dst = tmp_path / "dst"
    killed = subprocess.run(
        [sys.executable, str(DRIVER), str(src), str(dst), "150000", "tensor:35", "0", "auto"], timeout=300
    )
    assert killed.returncode != 0 and dst_status(dst) == "unfinished"
    shard = sorted(src.glob("*.safetensors"))[1]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # e.g. re-downloaded
    with pytest.raises(ConvertError, match=rf"source changed since this run began \(.*{shard.name}: mtime changed\)"):
        run(src, dst, Policy(), shard_bytes=150_000, resume=True)
    assert dst_status(dst) == "unfinished"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_a_torn_last_journal_line_is_skipped_and_the_next_entry_starts_a_line_of_its_own(tmp_path):
    """One rule for a crash mid-line, in every reader (``RunState.finished``, ``run``'s free-space check): a line
    that is not a whole entry is skipped, its shard redone; the next run's entry is not glued onto it."""
    state = RunState(tmp_path, "fingerprint", resume=True)
    state.dir.mkdir()
    whole = json.dumps({"file": "model-00001-of-00003.safetensors", "size": 10, "header_sha256": "ab"})
    torn = json.dumps({"file": "model-00002-of-00003.safetensors", "size": 20, "header_sha256": "cd"})[:-9]
    state.journal.write_text(whole + "\n" + torn)
    assert read_journal(state.journal) == state.finished() == {"model-00001-of-00003.safetensors": json.loads(whole)}
    state.record("model-00003-of-00003.safetensors", 30, "ef")
    assert sorted(read_journal(state.journal)) == [
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert read_journal(tmp_path / "absent.jsonl") == {}
