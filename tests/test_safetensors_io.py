"""Streaming safetensors pieces, checked against the ``safetensors`` library itself."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_convert.errors import ConvertError
from nvfp4_convert.safetensors_io import DTYPES, TORCH_TO_ST, OutEntry, ShardWriter, read_header, read_rows

ALL = {
    "u8": torch.arange(12, dtype=torch.uint8).reshape(3, 4),
    "bf16": torch.randn(5, 3).to(torch.bfloat16),
    "f32": torch.randn(2, 2),
    "scalar": torch.tensor(3.5),
    "i64": torch.arange(6).reshape(2, 3),
    "e4m3": torch.randn(4, 4).to(torch.float8_e4m3fn),
    "e8m0": torch.tensor([[0.25, 1.0], [8.0, 2.0**-20]]).to(torch.float8_e8m0fnu),
    "empty": torch.zeros(0, 4),
}


def _write(path, tensors):
    entries = [OutEntry(k, TORCH_TO_ST[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    with ShardWriter(path, entries) as w:
        for k, v in reversed(tensors.items()):  # any order of tensors: each has its own byte range
            w.sink(k).write(v)
        w.commit()


def test_written_shard_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "a.safetensors"
    _write(path, ALL)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(ALL)
        for k, v in ALL.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert not path.with_name("a.safetensors.partial").exists()


def test_header_reader_agrees_with_safetensors_files(tmp_path):
    path = tmp_path / "b.safetensors"
    save_file({k: v for k, v in ALL.items() if k != "empty"}, path)
    tensors, _ = read_header(path)
    for name, info in tensors.items():
        assert DTYPES[info.dtype][0] == ALL[name].dtype
        assert torch.equal(read_rows(info).reshape(-1).view(torch.uint8), ALL[name].reshape(-1).view(torch.uint8))


def test_row_bands(tmp_path):
    path = tmp_path / "c.safetensors"
    x = torch.randn(10, 6)
    save_file({"x": x}, path)
    info = read_header(path)[0]["x"]
    assert torch.equal(read_rows(info, 3, 7), x[3:7])
    assert torch.equal(read_rows(info, 8, 100), x[8:])


@pytest.mark.parametrize("mode", ["direct", "copy_file_range", "userspace"])
def test_copy_run_gives_the_source_bytes(tmp_path, monkeypatch, mode):
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.randn(3), "b": torch.randn(64, 64), "c": torch.randn(1)}, src)
    infos = read_header(src)[0]
    if mode == "userspace":  # a filesystem pair without copy_file_range
        monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "xdev")))
    names = sorted(infos, key=lambda n: infos[n].start)
    dst = tmp_path / "dst.safetensors"
    entries = [OutEntry("head", "U8", (5,))] + [OutEntry(n, infos[n].dtype, infos[n].shape) for n in names]
    seen = bytearray()
    with ShardWriter(dst, entries, direct=mode == "direct") as w:
        w.sink("head").write(b"12345")
        w.copy_run(names, src, infos[names[0]].start, inspect=lambda offset, view: seen.extend(view))
        w.commit()
    with safe_open(dst, "pt") as f, safe_open(src, "pt") as g:
        for n in names:
            assert torch.equal(f.get_tensor(n), g.get_tensor(n))
    first, last = infos[names[0]], infos[names[-1]]
    assert bytes(seen) == src.read_bytes()[first.start : last.end]  # inspect saw every byte, in order


def test_copy_run_must_be_contiguous_in_the_shard(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.randn(3), "b": torch.randn(3)}, src)
    infos = read_header(src)[0]
    entries = [OutEntry("a", "F32", (3,)), OutEntry("x", "F32", (1,)), OutEntry("b", "F32", (3,))]
    with pytest.raises(ConvertError, match="not contiguous"), ShardWriter(tmp_path / "d.safetensors", entries) as w:
        w.copy_run(["a", "b"], src, infos["a"].start)


def test_writer_refuses_wrong_sizes_and_incomplete_shards(tmp_path):
    path = tmp_path / "d.safetensors"
    with pytest.raises(ConvertError, match="header says"), ShardWriter(path, [OutEntry("x", "F32", (2,))]) as w:
        w.sink("x").write(torch.zeros(3))
    assert not path.exists() and not path.with_name("d.safetensors.partial").exists()
    w = ShardWriter(path, [OutEntry("x", "F32", (2,)), OutEntry("y", "F32", (1,))])
    w.sink("x").write(torch.zeros(2))
    with pytest.raises(ConvertError, match="incomplete"):
        w.commit()
    assert not path.exists() and not path.with_name("d.safetensors.partial").exists()


def test_header_is_padded_to_8_bytes(tmp_path):
    path = tmp_path / "e.safetensors"
    _write(path, {"odd_name_": torch.zeros(1)})
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    assert json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"] == {"format": "pt"}
