"""Shared fixtures: the checkpoints under test and conversions of them, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvfp4_convert.convert import run
from nvfp4_convert.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
REPO_FIXTURE = ROOT / "tests" / "fixtures" / "tiny-dsv4"
GOLDEN = ROOT / "tests" / "fixtures" / "tiny-dsv4-golden" / "dequant.safetensors"
SHARED_FIXTURE = ROOT.parent / "shared" / "fixtures" / "tiny-dsv4-modelopt"
E2E_FIXTURE = ROOT / "tests" / "fixtures" / "tiny-dsv4-e2e"

SOURCES = {"repo": REPO_FIXTURE, "shared": SHARED_FIXTURE}


def _available(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} not present")
    return path


@pytest.fixture(scope="session", params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> Path:
    """Each source checkpoint: the repo's multi-shard fixture and the shared single-file export."""
    return _available(SOURCES[request.param])


@pytest.fixture(scope="session")
def convert_once(tmp_path_factory: pytest.TempPathFactory):
    """``convert_once(src, policy, experts, attention_from=None)`` -> DST, converted at most once per session."""
    cache: dict[tuple[Path, str, str, Path | None], Path] = {}

    def convert(src: Path, policy: str = "default", experts: str = "nvfp4", attention_from: Path | None = None) -> Path:
        key = (src, policy, experts, attention_from)
        if key not in cache:
            graft = "-graft" if attention_from is not None else ""
            dst = tmp_path_factory.mktemp(f"{src.name}-{policy}-{experts}{graft}") / "out"
            run(src, dst, Policy(policy, experts), attention_from=attention_from)
            cache[key] = dst
        return cache[key]

    return convert


@pytest.fixture
def src_unchanged(monkeypatch):
    """Every checkpoint the tool opens in this test (SRC, REF) is byte-for-byte the same when the test ends.

    Its files are hashed when ``Checkpoint.open`` first sees the folder (after the test built it, before the tool
    touched it) and again at teardown.
    """
    import hashlib

    from nvfp4_convert import checkpoint

    seen: dict[Path, dict[str, str]] = {}
    original = checkpoint.Checkpoint.open.__func__

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    def recording_open(cls, path, *args, **kwargs):
        folder = Path(path)
        if folder.is_dir() and folder not in seen:
            seen[folder] = digest(folder)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpoint, "open", classmethod(recording_open))
    yield seen
    for folder, before in seen.items():
        assert digest(folder) == before, f"{folder} changed"
