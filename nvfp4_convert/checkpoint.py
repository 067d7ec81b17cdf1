"""A checkpoint directory on disk: its shards, index, config and other files, read-only.

``Checkpoint.open(path)`` reads ``model.safetensors.index.json`` (or the single ``*.safetensors``
file), validates every shard header and the index against them (missing shard, tensor absent
from its shard, tensor in two shards, shard tensor absent from the index), and loads
``config.json``. Nothing is read from tensor data here.

SRC may come from anywhere: an index entry must be a plain file name inside SRC (never a path, ``..``, or
anything but a string), every file read must be a regular file (a FIFO or device is refused, never opened),
JSON files are read up to ``MAX_JSON_BYTES``, and subfolders of SRC are listed so that the
report says they were not carried over (``not_carried``, with temporary ``*.partial`` files). Symbolic links in SRC are checked before anything is opened: one that
resolves inside SRC, or into the ``blobs/`` of a Hugging Face cache snapshot (``.../snapshots/REV/`` whose files
link to ``../../blobs/``), is followed; any other is refused by name unless ``allow_outside_links``. Every
followed link is listed (``links``: name -> resolved target) for the report.
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConvertError
from .safetensors_io import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
# Files a conversion writes itself; everything else in SRC is carried over.
GENERATED_FILES = {INDEX_NAME, "config.json", "hf_quant_config.json", "nvfp4-convert-report.json"}
GENERATED_FILES |= {"nvfp4-convert-report.txt"}
# An index of 881 GB in ~100k tensors is ~10 MB; a config a few KB.
MAX_JSON_BYTES = 64 * 2**20


@dataclass
class Checkpoint:
    """Tensor table (name -> location), config and auxiliary files of a checkpoint directory."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict
    shards: list[Path]
    other_files: list[Path] = field(default_factory=list)
    not_carried: dict[str, str] = field(default_factory=dict)  # name -> what it is (subfolder, temporary file)
    links: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, *, require_config: bool = True, allow_outside_links: bool = False) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise ConvertError("not a directory", file=path)
        links = _checked_links(path, allow_outside=allow_outside_links)
        shards = _shard_files(path)
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            shard_tensors, _ = read_header(shard)
            for name, info in shard_tensors.items():
                if name in tensors:
                    raise ConvertError(f"tensor also in {tensors[name].file.name}", file=shard, tensor=name)
                tensors[name] = info
        index = path / INDEX_NAME
        if index.exists():
            _check_index(index, tensors)
        config = _read_config(path) if require_config or (path / "config.json").exists() else {}
        others, not_carried = [], {}
        for p in sorted(path.iterdir()):
            if p.name.startswith(".") or p.suffix == ".safetensors" or p.name in GENERATED_FILES:
                continue
            if p.suffix == ".partial":  # a temporary file (ours or a download's)
                not_carried[p.name] = "temporary file"
            elif p.is_dir():
                not_carried[p.name] = "subfolder"
            else:
                regular_file(p, "file")
                others.append(p)
        return cls(path, tensors, config, shards, others, not_carried, links)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


_BLOB_NAME = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # a Hugging Face cache blob: git or sha256 hash


def _checked_links(path: Path, *, allow_outside: bool) -> dict[str, str]:
    """Every symlink at SRC's top level (where all it reads lives) -> its target, refusing ones that leave SRC.

    A Hugging Face cache snapshot's link is followed when it resolves to a file named by a hash directly in the
    repository's real (not symlinked) ``blobs/`` folder.
    """
    root = path.resolve()
    repo = root.parent.parent
    blobs = repo / "blobs" if root.parent.name == "snapshots" else None
    if blobs is not None and (blobs.is_symlink() or not blobs.is_dir()):
        blobs = None
    links: dict[str, str] = {}
    for p in sorted(path.iterdir()):
        if not p.is_symlink():
            continue
        try:
            target = p.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # dangling, or a loop
            raise ConvertError(f"symlink that does not resolve: {e}", file=p) from None
        inside = root in target.parents
        cached = blobs is not None and target.parent == blobs.resolve() and bool(_BLOB_NAME.match(target.name))
        if not (inside or cached or allow_outside):
            raise ConvertError(
                f"symlink to {target}, outside the source folder: refused (--allow-outside-links follows it)", file=p
            )
        links[p.name] = str(target)
    return links


def is_plain_name(name: object) -> bool:
    """A file name that stays inside its directory: a non-empty string, no separator, not ``.``/``..``, no NUL."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in ("/", "\\", "\x00"))


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is (or links to) a regular file; a FIFO, device, socket or folder is refused unopened."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConvertError(f"{what} missing", file=path) from None
    except OSError as e:
        raise ConvertError(f"cannot stat {what}: {e.strerror}", file=path) from e
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
        kind |= {stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}
        raise ConvertError(f"{what} is {kind.get(stat.S_IFMT(mode), 'not a regular file')}: refused", file=path)
    return path


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError("no weight_map in the index", file=index)
        for tensor, name in weight_map.items():
            if not is_plain_name(name):
                raise ConvertError(
                    f"index entry {name!r} is not a plain file name in the source folder", file=index, tensor=tensor
                )
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).exists():
                tensor = next(t for t, s in weight_map.items() if s == name)
                raise ConvertError(f"index names missing shard {name}", file=index, tensor=tensor)
        return [regular_file(path / n, "shard") for n in names]
    files = [regular_file(p, "shard") for p in sorted(path.glob("*.safetensors"))]
    if not files:
        raise ConvertError("no *.safetensors file and no model.safetensors.index.json", file=path)
    return files


def _check_index(index: Path, tensors: dict[str, TensorInfo]) -> None:
    weight_map: dict[str, str] = _read_json(index)["weight_map"]
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            raise ConvertError(f"index places it in {shard}, which does not hold it", file=index, tensor=name)
    for name, info in tensors.items():
        if name not in weight_map:
            raise ConvertError("tensor in a shard but not in the index", file=info.file, tensor=name)


def _read_json(path: Path) -> dict:
    size = regular_file(path, "JSON file").stat().st_size
    if size > MAX_JSON_BYTES:
        raise ConvertError(
            f"{size} bytes: larger than the {MAX_JSON_BYTES >> 20} MiB a JSON file here may be", file=path
        )
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise ConvertError(f"cannot read: {e.strerror}", file=path) from e
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a huge integer, absurd nesting
        raise ConvertError(f"invalid JSON: {str(e)[:200]}", file=path) from None
    if not isinstance(data, dict):
        raise ConvertError("not a JSON object", file=path)
    return data


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ConvertError("missing config.json", file=path)
    config = _read_json(cfg_path)
    if config.get("model_type") != "deepseek_v4":
        raise ConvertError(
            f"model_type is {config.get('model_type')!r}, not 'deepseek_v4': not a DeepSeek-V4 checkpoint",
            file=cfg_path,
        )
    return config
