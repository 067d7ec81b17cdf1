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


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # OCP / ModelOpt


def modelopt_value(tensors: Tensors, module: str) -> torch.Tensor:
    """float32 value of one ModelOpt linear, computed here without the package: NVFP4 (any block) as
    ``E2M1[code] * (float32(weight_scale) * weight_scale_2)`` in ModelOpt's order, per-tensor FP8 as
    ``float32(weight) * weight_scale``, a plain weight as its float32 cast."""
    w = tensors[f"{module}.weight"]
    if w.dtype == torch.uint8:
        b = w.to(torch.int64)
        codes = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(b.shape[0], -1)
        ws = tensors[f"{module}.weight_scale"].to(torch.float32) * tensors[f"{module}.weight_scale_2"].float()
        return torch.tensor(E2M1)[codes] * ws.repeat_interleave(codes.shape[1] // ws.shape[1], 1)
    if w.dtype == torch.float8_e4m3fn:
        return w.to(torch.float32) * tensors[f"{module}.weight_scale"].to(torch.float32)
    return w.to(torch.float32)


def plant(good: Path, dst: Path, change: Callable[[Tensors], None] | None = None, config=None) -> Path:
    """A copy of a finished conversion with one fault planted (tensors rewritten as one shard)."""
    shutil.copytree(good, dst)
    tensors = load_all(good)
    if change:
        change(tensors)
        for shard in dst.glob("*.safetensors"):
            shard.unlink()
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model-00001-of-00001.safetensors")
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": size},
            "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors"),
        }
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst
