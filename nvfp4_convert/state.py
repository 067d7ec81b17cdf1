"""The destination's state while a conversion is under way: lock, plan fingerprint, journal.

Before DST's state is even read, ``destination_lock`` takes an exclusive ``flock`` on DST itself, so two
runs started together can never both pass the checks. A DST being written holds ``.nvfp4-convert/`` with
``lock`` (an exclusive ``flock`` held for the whole run), ``plan.json`` (the fingerprint of the plan being
executed and the identity of every source file: size, mtime, inode; ``--resume`` refuses a source that
changed since) and ``journal.jsonl`` (one line per finished shard: file, size, sha256 of its header). The report is written last and the
state directory removed after it, so a DST is finished exactly when it has the report and no
state directory (``dst_status``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError
from .plan import Plan
from .report import REPORT_JSON
from .safetensors_io import encode_header, fsync_dir

STATE_DIR = ".nvfp4-convert"
JOURNAL = "journal.jsonl"  # inside STATE_DIR


def plan_fingerprint(plan: Plan) -> str:
    """Stable hash of everything that determines the output bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([plan.policy.name, plan.policy.experts, plan.ignored_layers]).encode())
    for shard in plan.shards:
        h.update(shard.file.encode())
        for o in shard.outputs:
            srcs = [(s.name, s.file.name, s.start, s.end) for s in o.sources]
            h.update(json.dumps([o.name, o.dtype, list(o.shape), o.op, srcs, o.value]).encode())
    return h.hexdigest()


def header_digest(plan_shard_entries: list) -> str:
    return hashlib.sha256(encode_header(plan_shard_entries)).hexdigest()


@contextmanager
def destination_lock(dst: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the DST folder itself (taken before its state is read)."""
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ConvertError("another nvfp4-convert run holds this destination", file=dst) from e
        yield
    finally:
        os.close(fd)


def source_identity(files: list[Path]) -> dict[str, list[int]]:
    """Resolved path -> [size, mtime_ns, inode] of each file read (SRC's shards, REF's), as the run began."""
    out = {}
    for f in files:
        st = f.stat()
        out[str(f.resolve())] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def _changed(recorded: dict[str, list[int]], now: dict[str, list[int]]) -> str | None:
    for name in sorted(set(recorded) | set(now)):
        a, b = recorded.get(name), now.get(name)
        if a is None or b is None:
            return f"{name} {'appeared' if a is None else 'disappeared'}"
        what = [w for w, x, y in zip(("size", "mtime", "inode"), a, b, strict=True) if x != y]
        if what:
            return f"{name}: {', '.join(what)} changed"
    return None


def read_journal(path: Path) -> dict[str, dict]:
    """The finished shards a journal records: file -> entry (``file``, ``size``, ``header_sha256``); none if absent.

    The one rule for a line torn by a crash (only the last line can be: each is fsynced before the next): a line that
    is not a whole entry is skipped, so its shard counts as unfinished and is written again.
    """
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("header_sha256"), str)
        ):
            out[entry["file"]] = entry
    return out


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def dst_status(dst: Path) -> str:
    """``missing`` | ``empty`` | ``finished`` | ``unfinished`` (a run started here and did not end) | ``foreign``."""
    if not dst.exists():
        return "missing"
    if not dst.is_dir():
        return "foreign"
    if (dst / STATE_DIR).exists():
        return "unfinished"
    if (dst / REPORT_JSON).exists():
        return "finished"
    return "empty" if not any(dst.iterdir()) else "foreign"


class RunState:
    """Lock + journal of one DST; use as a context manager around the run."""

    def __init__(
        self, dst: Path, fingerprint: str, *, resume: bool, sources: dict[str, list[int]] | None = None
    ) -> None:
        self.dir = dst / STATE_DIR
        self.fingerprint = fingerprint
        self.resume = resume
        self.sources = sources or {}
        self._lock_fd: int | None = None

    def __enter__(self) -> RunState:
        self.dir.mkdir(exist_ok=True)  # DST itself exists and is locked: never recreate it
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConvertError("another nvfp4-convert run holds this destination", file=self.dir.parent) from e
        plan_file = self.dir / "plan.json"
        if plan_file.exists():
            try:
                recorded = json.loads(plan_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConvertError(f"unreadable run state ({e}); start in an empty directory", file=plan_file) from e
            if recorded.get("fingerprint") != self.fingerprint:
                raise ConvertError(
                    "an unfinished run with a different plan (source, policy or options) is here; "
                    "use the same options or start in an empty directory",
                    file=self.dir.parent,
                )
            changed = _changed(recorded.get("sources", {}), self.sources)
            if changed:
                raise ConvertError(
                    f"the source changed since this run began ({changed}): its finished shards may not match; "
                    "start again in an empty directory",
                    file=self.dir.parent,
                )
        else:
            plan_file.write_text(json.dumps({"fingerprint": self.fingerprint, "sources": self.sources}))
        return self

    def __exit__(self, *_: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def journal(self) -> Path:
        return self.dir / JOURNAL

    def finished(self) -> dict[str, dict]:
        """Journal entries (file -> entry) of shards already finished."""
        return read_journal(self.journal)

    def record(self, file: str, size: int, header_sha256: str) -> None:
        """Append one finished shard's line (after a torn last line, on a line of its own), fsynced."""
        with open(self.journal, "ab") as f:
            torn = f.tell() > 0 and not _ends_with_newline(self.journal)
            entry = json.dumps({"file": file, "size": size, "header_sha256": header_sha256})
            f.write((("\n" if torn else "") + entry + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """Delete the state directory: the DST is finished."""
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()
        fsync_dir(self.dir.parent)
