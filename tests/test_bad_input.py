"""Bad input: every case stops the run with one line naming the file (and tensor), a non-zero exit,
and no DST that looks complete (CONTRACT traps aside, issue 'Scale' item 4)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO_FIXTURE
from helpers import mutated_copy
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.state import dst_status

L2 = "model.layers.2"
OA = f"{L2}.self_attn.o_a_proj"
EXPERT = f"{L2}.mlp.experts.0.gate_proj"


def _rewrite_header(path: Path, edit: Callable[[dict], None], *, keep_length: bool = False) -> None:
    """Edit the JSON header of a safetensors file in place (data unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _single(tmp: Path, change=None, config=None) -> Path:
    return mutated_copy(REPO_FIXTURE, tmp / "src", change, config=config)


def _sharded(tmp: Path) -> Path:
    dst = tmp / "src"
    shutil.copytree(REPO_FIXTURE, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _set(name: str, value: torch.Tensor):
    return lambda t: t.__setitem__(name, value)


def _header_case(edit: Callable[[dict], None]):
    def make(tmp: Path) -> Path:
        src = _single(tmp)
        _rewrite_header(src / "model.safetensors", edit)
        return src

    return make


def _raw_case(mangle: Callable[[bytes], bytes]):
    def make(tmp: Path) -> Path:
        src = _single(tmp)
        f = src / "model.safetensors"
        f.write_bytes(mangle(f.read_bytes()))
        return src

    return make


def _first_offsets(h: dict) -> tuple[str, list[int]]:
    name = next(k for k in h if k != "__metadata__" and h[k]["data_offsets"][0] > 0)
    return name, h[name]["data_offsets"]


def _overlap(h: dict) -> None:
    name, (b, e) = _first_offsets(h)
    h[name]["data_offsets"] = [b - 2, e - 2]


def _outside(h: dict) -> None:
    name, (b, e) = _first_offsets(h)
    h[name]["data_offsets"] = [b + 10**9, e + 10**9]


def _inconsistent(h: dict) -> None:
    h[f"{OA}.weight"]["shape"] = [128, 65]


def _bad_dtype(h: dict) -> None:
    h[f"{OA}.weight"]["dtype"] = "F4_E2M1_PACKED"


def _index_missing_shard(tmp: Path) -> Path:
    src = _sharded(tmp)
    (src / "model-00002-of-00003.safetensors").unlink()
    return src


def _index_wrong_shard(tmp: Path) -> Path:
    src = _sharded(tmp)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = next(s for s in set(idx["weight_map"].values()) if s != idx["weight_map"][name])
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return src


def _tensor_in_two_shards(tmp: Path) -> Path:
    src = _single(tmp)
    from safetensors.torch import save_file

    save_file({f"{OA}.weight": torch.zeros(1, dtype=torch.uint8)}, src / "model-extra.safetensors")
    return src


def _no_config(tmp: Path) -> Path:
    src = _single(tmp)
    (src / "config.json").unlink()
    return src


def _no_shards(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    shutil.copy(REPO_FIXTURE / "config.json", src / "config.json")
    return src


def _drop(name: str):
    return lambda t: t.pop(name)


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    # case: (make source, regex the one-line message must match; file names are checked separately)
    "header length larger than the file": (_raw_case(lambda b: struct.pack("<Q", len(b) * 2) + b[8:]), "header length"),
    "file shorter than 8 bytes": (_raw_case(lambda b: b[:5]), "shorter than the 8-byte"),
    "truncated data": (_raw_case(lambda b: b[: len(b) - 1000]), "truncated"),
    "invalid header JSON": (_raw_case(lambda b: b[:8] + b"#" + b[9:]), "invalid header JSON"),
    "offsets outside the data": (_header_case(_outside), "outside the data"),
    "overlapping tensors": (_header_case(_overlap), "overlaps"),
    "offsets disagree with dtype/shape": (_header_case(_inconsistent), "needs"),
    "unknown dtype": (_header_case(_bad_dtype), "unsupported dtype"),
    "a list as dtype": (
        _header_case(lambda h: h[f"{OA}.weight_scale_2"].__setitem__("dtype", [])),
        "unsupported dtype",
    ),
    "JSON true as a dimension": (
        _header_case(lambda h: h[f"{OA}.weight_scale_2"].__setitem__("shape", [True])),
        "invalid shape",
    ),
    "JSON false as an offset": (
        _header_case(lambda h: h[f"{OA}.weight_scale_2"].__setitem__("data_offsets", [False, 4])),
        "invalid data_offsets",
    ),
    "weight_scale not e4m3": (lambda t: _single(t, _set(f"{OA}.weight_scale", torch.ones(128, 4))), "must be F8_E4M3"),
    "weight_scale wrong shape": (
        lambda t: _single(t, _set(f"{OA}.weight_scale", torch.ones(128, 2).to(torch.float8_e4m3fn))),
        "weight_scale shape",
    ),
    "weight without weight_scale": (lambda t: _single(t, _drop(f"{OA}.weight_scale")), "without its weight_scale"),
    "weight without weight_scale_2": (
        lambda t: _single(t, _drop(f"{EXPERT}.weight_scale_2")),
        "without its weight_scale_2",
    ),
    "scale without weight": (lambda t: _single(t, _drop(f"{OA}.weight")), "no weight"),
    "NaN global scale": (
        lambda t: _single(t, _set(f"{OA}.weight_scale_2", torch.tensor(float("nan")))),
        "finite and > 0",
    ),
    "zero global scale": (lambda t: _single(t, _set(f"{EXPERT}.weight_scale_2", torch.tensor(0.0))), "finite and > 0"),
    "negative global scale": (
        lambda t: _single(t, _set(f"{OA}.weight_scale_2", torch.tensor(-1e-3))),
        "finite and > 0",
    ),
    "Inf input scale": (
        lambda t: _single(t, _set(f"{EXPERT}.input_scale", torch.tensor(float("inf")))),
        "finite and > 0",
    ),
    "global scale not a scalar": (lambda t: _single(t, _set(f"{OA}.weight_scale_2", torch.ones(2))), "float32 scalar"),
    "NaN block scale (converted)": (
        lambda t: _single(t, lambda d: d[f"{OA}.weight_scale"].view(torch.uint8)[3, 1].fill_(0x7F)),
        "NaN or negative",
    ),
    "negative block scale (expert)": (
        lambda t: _single(t, lambda d: d[f"{EXPERT}.weight_scale"].view(torch.uint8)[0, 0].fill_(0xB8)),
        "NaN or negative",
    ),
    "1-D linear weight": (
        lambda t: _single(t, _set(f"{L2}.self_attn.o_b_proj.weight", torch.zeros(8, dtype=torch.bfloat16))),
        "2-D",
    ),
    "NaN in a BF16 linear (converted)": (
        lambda t: _single(t, lambda d: d["model.layers.1.self_attn.o_a_proj.weight"].__setitem__((3, 5), float("nan"))),
        r"decoded value \[3, 5\] is nan .*not finite",
    ),
    "Inf global scale (converted)": (
        lambda t: _single(t, _set(f"{OA}.weight_scale_2", torch.tensor(float("inf")))),
        "not finite|finite",
    ),
    "index names a missing shard": (_index_missing_shard, "missing shard"),
    "index places a tensor in the wrong shard": (_index_wrong_shard, "does not hold it"),
    "tensor in two shards": (_tensor_in_two_shards, "also in"),
    "missing config.json": (_no_config, "missing config.json"),
    "not DeepSeek-V4": (lambda t: _single(t, config=lambda c: c.update(model_type="llama")), "not 'deepseek_v4'"),
    "unsupported config": (
        lambda t: _single(t, config=lambda c: [c.pop(k) for k in ("layer_types", "compress_rates")]),
        "cannot derive compress_ratios",
    ),
    "no safetensors at all": (_no_shards, "no \\*.safetensors"),
    "unrecognised tensor": (
        lambda t: _single(t, _set(f"{L2}.self_attn.extra.weight", torch.ones(2, 2))),
        "no DeepSeek-V4 naming rule",
    ),
}


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_in_one_line(tmp_path, case):
    make, pattern = CASES[case]
    src = make(tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = tmp_path / "dst"
    code, output = _invoke(["run", str(src), str(dst), "--quiet", "--workers", "1"])
    assert code != 0, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert str(src) in lines[0] or "config.json" in lines[0], lines[0]  # names the file
    assert dst_status(dst) in ("missing", "unfinished"), dst_status(dst)
    assert not (dst / "model.safetensors.index.json").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # SRC untouched


@pytest.mark.parametrize("io", ["direct", "buffered"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_bad_expert_block_scale_is_located_exactly_whatever_the_chunking(tmp_path, monkeypatch, io, where):
    """Copied (expert) scales are checked chunk by chunk as they stream by: with chunks of one
    block, the bad code is still found and named by its tensor and [row, column]."""
    import threading

    from nvfp4_convert import direct_io, safetensors_io

    monkeypatch.setattr(direct_io, "CHUNK", direct_io.BLOCK)
    monkeypatch.setattr(direct_io, "_local", threading.local())
    monkeypatch.setattr(safetensors_io, "COPY_CHUNK", 1000)
    at: list[int] = []

    def plant(d: dict) -> None:
        scale = d[f"{EXPERT}.weight_scale"].view(torch.uint8)
        at.extend([0, 0] if where == "first" else [scale.shape[0] - 1, scale.shape[1] - 1])
        scale[at[0], at[1]] = 0xFF  # NaN

    src = _single(tmp_path, plant)
    code, output = _invoke(["run", str(src), str(tmp_path / "dst"), "--quiet", "--workers", "1", "--io", io])
    assert code == 1
    assert f"block scale {at} is nan: NaN or negative" in " ".join(output.split()), output
    assert f"{EXPERT}.weight_scale" in output


def test_bad_tensor_names_the_tensor(tmp_path):
    src = CASES["weight without weight_scale"][0](tmp_path)
    _, output = _invoke(["run", str(src), str(tmp_path / "dst"), "--quiet"])
    assert f"{OA}.weight" in output


def test_destination_inside_source_is_refused(tmp_path):
    src = _single(tmp_path)
    code, output = _invoke(["run", str(src), str(src / "out"), "--quiet"])
    assert code == 1 and "inside" in output
    code, output = _invoke(["run", str(src), str(src), "--quiet"])
    assert code == 1 and "source" in output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_destination_not_writable_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    code, output = _invoke(["run", str(REPO_FIXTURE), str(parent / "out"), "--quiet"])
    assert code == 1 and "not writable" in output


def test_destination_not_writable_is_refused_even_as_root(tmp_path, monkeypatch):
    import nvfp4_convert.convert as convert

    monkeypatch.setattr(convert, "writable", lambda path: False)
    code, output = _invoke(["run", str(REPO_FIXTURE), str(tmp_path / "out"), "--quiet"])
    assert code == 1 and "not writable" in output


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1))  # type: ignore[attr-defined]
    code, output = _invoke(["run", str(REPO_FIXTURE), str(tmp_path / "out"), "--quiet"])
    assert code == 1 and "GB free" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("io", "syscall"), [("direct", "pwrite"), ("buffered", "copy_file_range")])
def test_disk_full_mid_run_fails_cleanly_and_resumes(tmp_path, monkeypatch, io, syscall):
    real = getattr(os, syscall)
    calls = {"n": 0}

    def full_after_some(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, syscall, full_after_some)
    dst = tmp_path / "out"
    args = ["--quiet", "--shard-size", "200kB", "--workers", "1", "--io", io]
    code, output = _invoke(["run", str(REPO_FIXTURE), str(dst), *args])
    assert code == 1 and "No space left" in output and "--resume" in output
    assert dst_status(dst) == "unfinished"
    assert not list(dst.glob("*.partial")) and not (dst / "model.safetensors.index.json").exists()
    assert any(dst.glob("*.safetensors")), "the failure should come mid-run, after a finished shard"
    monkeypatch.setattr(os, syscall, real)
    code, output = _invoke(["run", str(REPO_FIXTURE), str(dst), "--resume", *args])
    assert code == 0, output
    assert dst_status(dst) == "finished"


def test_finished_destination_is_not_overwritten(tmp_path, convert_once):
    dst = convert_once(REPO_FIXTURE)
    code, output = _invoke(["run", str(REPO_FIXTURE), str(dst), "--quiet"])
    assert code == 1 and "finished conversion" in output


def test_unfinished_destination_needs_resume(tmp_path):
    dst = tmp_path / "out"
    (dst / ".nvfp4-convert").mkdir(parents=True)
    code, output = _invoke(["run", str(REPO_FIXTURE), str(dst), "--quiet"])
    assert code == 1 and "--resume" in output


def test_foreign_destination_is_refused(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep")
    code, output = _invoke(["run", str(REPO_FIXTURE), str(dst), "--quiet"])
    assert code == 1 and "not empty" in output
    assert (dst / "precious.txt").read_text() == "keep"


def test_case_count():
    assert len(CASES) >= 20
