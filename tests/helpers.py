"""Test helpers: read a whole (tiny) checkpoint and write modified copies of it with safetensors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from nvfp4_convert.preflight.reference import load_tensors

Tensors = dict[str, torch.Tensor]


def load_all(path: Path) -> Tensors:
    """Every tensor of a checkpoint directory, read with safetensors (tiny fixtures only)."""
    return load_tensors(path)


def mutated_copy(
    src: Path,
    dst: Path,
    change: Callable[[Tensors], None] | None = None,
    *,
    config: Callable[[dict], None] | None = None,
) -> Path:
    """Copy ``src`` to ``dst`` as a single shard after ``change`` edited its tensors (``config`` its config)."""
    dst.mkdir(parents=True)
    tensors = load_all(src)
    if change is not None:
        change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
            (dst / f.name).chmod(0o644)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst
