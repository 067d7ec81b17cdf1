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
