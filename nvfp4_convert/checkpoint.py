"""A checkpoint directory on disk: its shards, index, config and other files, read-only.

``Checkpoint.open(path)`` reads ``model.safetensors.index.json`` (or the single ``*.safetensors``
file), validates every shard header and the index against them (missing shard, tensor absent
from its shard, tensor in two shards, shard tensor absent from the index), and loads
``config.json``. Nothing is read from tensor data here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConvertError
from .safetensors_io import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
# Files a conversion writes itself; everything else in SRC is carried over.
GENERATED_FILES = {INDEX_NAME, "config.json", "hf_quant_config.json"}


@dataclass
class Checkpoint:
    """Tensor table (name -> location), config and auxiliary files of a checkpoint directory."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict
    shards: list[Path]
    other_files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, *, require_config: bool = True) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise ConvertError("not a directory", file=path)
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
        others = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and p.suffix != ".safetensors"
            and p.name not in GENERATED_FILES
            and not p.name.startswith(".")
        )
        return cls(path, tensors, config, shards, others)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError("no weight_map in the index", file=index)
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).is_file():
                tensor = next(t for t, s in weight_map.items() if s == name)
                raise ConvertError(f"index names missing shard {name}", file=index, tensor=tensor)
        return [path / n for n in names]
    files = sorted(p for p in path.glob("*.safetensors"))
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
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConvertError(f"cannot read: {e.strerror}", file=path) from e
    except json.JSONDecodeError as e:
        raise ConvertError(f"invalid JSON: {e}", file=path) from e
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
