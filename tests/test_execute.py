"""Execution: output bytes depend only on the plan (not on workers or band size); progress adds up."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import REPO_FIXTURE

import nvfp4_convert.execute as execute
from nvfp4_convert.convert import run
from nvfp4_convert.policy import Policy
from nvfp4_convert.state import dst_status


def _shard_digests(dst: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dst.glob("*.safetensors"))}


@pytest.mark.parametrize("policy", ["default", "fp8"])
def test_output_is_identical_for_one_and_many_workers(tmp_path, policy):
    one, many = tmp_path / "one", tmp_path / "many"
    run(REPO_FIXTURE, one, Policy(policy), workers=1, shard_bytes=200_000)
    run(REPO_FIXTURE, many, Policy(policy), workers=max(2, execute.default_workers() * 2), shard_bytes=200_000)
    assert len(_shard_digests(one)) > 3
    assert _shard_digests(one) == _shard_digests(many)
    assert (one / "model.safetensors.index.json").read_bytes() == (many / "model.safetensors.index.json").read_bytes()
    assert (one / "config.json").read_bytes() == (many / "config.json").read_bytes()


@pytest.mark.parametrize("policy", ["default", "fp8"])
def test_direct_and_buffered_io_write_the_same_bytes(tmp_path, monkeypatch, policy):
    import threading

    from nvfp4_convert import direct_io

    monkeypatch.setattr(direct_io, "CHUNK", 2 * direct_io.BLOCK)  # many chunks, many shared blocks
    monkeypatch.setattr(direct_io, "_local", threading.local())
    direct, buffered, cached = tmp_path / "direct", tmp_path / "buffered", tmp_path / "cached"
    report = run(REPO_FIXTURE, direct, Policy(policy), shard_bytes=200_000, io="direct")
    assert report["timing"]["io"] == "direct" and report["timing"]["reads_through_page_cache"] == []
    assert run(REPO_FIXTURE, buffered, Policy(policy), shard_bytes=200_000, io="buffered")["timing"]["io"] == "buffered"
    # auto, with the source in the page cache (the tests just read it): copies read from memory, written O_DIRECT
    report = run(REPO_FIXTURE, cached, Policy(policy), shard_bytes=200_000, io="auto")
    assert report["timing"]["io"] == "direct" and len(report["timing"]["reads_through_page_cache"]) == 3
    assert len(_shard_digests(direct)) > 3
    assert _shard_digests(direct) == _shard_digests(buffered) == _shard_digests(cached)


def test_the_report_says_where_the_time_went(tmp_path):
    timing = run(REPO_FIXTURE, tmp_path / "dst", Policy("default"), shard_bytes=200_000, io="direct")["timing"]
    phases = timing["phases"]
    assert set(phases) == {"prepare", "read", "write", "convert", "fsync", "shards", "metadata"}
    assert all(v >= 0 for v in phases.values()) and phases["read"] > 0 and phases["convert"] > 0
    assert phases["prepare"] + phases["shards"] <= timing["shards_seconds"] + 0.01


def test_copies_back_to_back_in_the_source_form_one_run():
    from nvfp4_convert.plan import OutputTensor
    from nvfp4_convert.safetensors_io import TensorInfo

    def out(name: str, op: str, file: str, start: int, end: int) -> OutputTensor:
        info = TensorInfo(name, "U8", (end - start,), Path(file), start, end)
        return OutputTensor(name, "U8", (end - start,), op, (info,))

    outputs = [
        out("a", "copy", "f", 0, 10),
        out("b", "copy", "f", 10, 20),  # continues a
        out("c", "copy", "f", 30, 40),  # gap in the source
        out("d", "copy", "g", 40, 50),  # other file
        out("e", "bf16", "g", 50, 60),  # computed: breaks the run
        out("f", "copy", "g", 60, 70),
    ]
    assert [[o.name for o in run] for run in execute.copy_runs(outputs)] == [["a", "b"], ["c"], ["d"], ["f"]]


def test_row_bands_do_not_change_the_bytes(tmp_path, monkeypatch, convert_once):
    monkeypatch.setattr(execute, "BAND_BYTES", 1)  # one 128-row band at a time
    dst = tmp_path / "out"
    run(REPO_FIXTURE, dst, Policy("fp8", "bf16"))
    assert _shard_digests(dst) == _shard_digests(convert_once(REPO_FIXTURE, "fp8", "bf16"))


def test_band_rows_are_multiples_of_128_and_bounded():
    assert execute.band_rows(7168) % 128 == 0
    assert execute.band_rows(7168) * 7168 * 4 <= execute.BAND_BYTES
    assert execute.band_rows(10**9) == 128


def test_progress_counts_every_byte_and_tensor(tmp_path):
    seen = [0, 0]

    def progress(nbytes: int, ntensors: int) -> None:
        seen[0] += nbytes
        seen[1] += ntensors

    report = run(REPO_FIXTURE, tmp_path / "out", Policy(), workers=2, shard_bytes=300_000, progress=progress)
    assert seen == [report["totals"]["output_bytes"], report["totals"]["output_tensors"]]


def test_block_scale_check_on_raw_bytes_agrees_with_torch_on_all_256_codes():
    from nvfp4_convert.errors import ConvertError
    from nvfp4_convert.safetensors_io import TensorInfo

    info = TensorInfo("x.weight_scale", "F8_E4M3", (1, 1), Path("f"), 0, 1)
    for code in range(256):
        ws = torch.tensor([[code]], dtype=torch.uint8).view(torch.float8_e4m3fn)
        value = ws.float()
        bad = bool((~torch.isfinite(value) | (value < 0)).any())
        if bad:
            with pytest.raises(ConvertError, match="NaN or negative"):
                execute.check_block_scales(ws, info)
        else:
            execute.check_block_scales(ws, info)


def test_where_o_direct_is_refused_auto_falls_back_and_direct_says_so(tmp_path, monkeypatch, convert_once):
    import os

    from nvfp4_convert.errors import ConvertError

    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):  # a filesystem without O_DIRECT (EINVAL, as Linux says)
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    report = run(REPO_FIXTURE, tmp_path / "auto", Policy(), io="auto")
    assert report["timing"]["io"] == "buffered"
    assert _shard_digests(tmp_path / "auto") == _shard_digests(convert_once(REPO_FIXTURE))
    with pytest.raises(ConvertError, match=r"O_DIRECT refused \(.*Invalid argument\); use --io buffered"):
        run(REPO_FIXTURE, tmp_path / "direct", Policy(), io="direct")
    assert dst_status(tmp_path / "direct") == "missing"  # as it was: the advice can be followed
    assert run(REPO_FIXTURE, tmp_path / "direct", Policy(), io="buffered")["timing"]["io"] == "buffered"


def test_an_unknown_io_mode_is_refused_before_dst_is_touched(tmp_path):
    from nvfp4_convert.errors import ConvertError

    with pytest.raises(ConvertError, match="unknown I/O mode 'drect'"):
        run(REPO_FIXTURE, tmp_path / "out", Policy(), io="drect")
    assert dst_status(tmp_path / "out") == "missing"


@pytest.mark.parametrize("bad", [0, 1, 37, 255])
def test_scale_check_finds_a_bad_code_wherever_the_chunks_split_the_tensor(bad):
    from nvfp4_convert.errors import ConvertError
    from nvfp4_convert.safetensors_io import TensorInfo

    other = TensorInfo("x.weight", "U8", (7, 3), Path("f"), 100, 121)  # not a scale: never checked
    scale = TensorInfo("x.weight_scale", "F8_E4M3", (16, 16), Path("f"), 121, 377)
    data = bytearray(b"\xff" * 121 + b"\x38" * 256 + b"\xff" * 10)  # 0x38 = 1.0; 0xFF = NaN elsewhere
    data[121 + bad] = 0xFF
    check = execute.ScaleCheck([other, scale])
    for split in range(0, len(data) + 1, 7):
        with pytest.raises(ConvertError, match=rf"block scale \[{bad // 16}, {bad % 16}\] is nan"):
            for lo, hi in ((0, split), (split, len(data))):
                check(lo, memoryview(data)[lo:hi])


def test_a_shard_safetensors_cannot_read_is_never_journalled(tmp_path, monkeypatch):
    """Each shard is read back by the safetensors library before its journal line: a bad one stops the run."""
    import nvfp4_convert.convert as convert_mod
    from nvfp4_convert.errors import ConvertError
    from nvfp4_convert.safetensors_io import check_readable
    from nvfp4_convert.state import STATE_DIR, dst_status

    def corrupting(path, names):
        path.write_bytes(b"\xff" * 16)  # what a torn or foreign write would leave
        check_readable(path, names)

    monkeypatch.setattr(convert_mod, "check_readable", corrupting)
    dst = tmp_path / "out"
    with pytest.raises(ConvertError, match="unreadable by safetensors"):
        convert_mod.run(REPO_FIXTURE, dst, Policy(), shard_bytes=150_000)
    assert dst_status(dst) == "unfinished"
    journal = dst / STATE_DIR / "journal.jsonl"
    assert not journal.exists() or journal.read_text() == ""
