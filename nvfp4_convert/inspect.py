"""What a checkpoint holds, source or converted: naming, formats per role, layers, experts, MTP,
gate/up global-scale mismatches and bad scales; and whether a DST is a finished conversion.

Reads headers and scalar scales; with ``deep=True`` also every block-scale tensor (NaN, Inf,
negative, zero counts), which on the real checkpoint reads about a tenth of its bytes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .inventory import build_inventory, source_format
from .safetensors_io import read_tensor
from .state import dst_status


def inspect_checkpoint(path: Path, *, deep: bool = False) -> dict[str, Any]:
    path = Path(path)
    ckpt = Checkpoint.open(path)
    inv = build_inventory(ckpt, pass_unknown=True)
    formats = Counter((m.role.value, m.format) for m in inv.modules.values())
    layers = sorted({m.layer for m in inv.modules.values() if m.layer is not None})
    experts = inv.experts()
    mismatches = [{"expert": e, "w1": g, "w3": u} for e, g, u in inv.gate_up_mismatches()]
    bad_scales: list[dict[str, Any]] = []
    if deep:
        for m in inv.linears():
            for param in ("weight_scale", "scale"):
                if param in m.params:
                    counts = _scale_problems(read_tensor(m.params[param]))
                    if any(counts.values()):
                        bad_scales.append({"tensor": m.params[param].name, **counts})
    status = dst_status(path)
    quant = ckpt.config.get("quantization_config", {})
    return {
        "path": str(path),
        "status": "unfinished conversion"
        if status == "unfinished"
        else ("converted" if status == "finished" else "checkpoint"),
        "naming": inv.naming,
        "source_format": source_format(inv),
        "quant_method": quant.get("quant_method"),
        "tensors": len(ckpt.tensors),
        "bytes": ckpt.total_bytes,
        "shards": len(ckpt.shards),
        "layers": len(layers),
        "experts_per_layer": sorted({len(v) for v in experts.values()}),
        "mtp": any(m.name.startswith("mtp.") for m in inv.modules.values()),
        "mtp_layers": len({m.name.split(".")[1] for m in inv.modules.values() if m.name.startswith("mtp.")}),
        "formats": [{"role": r, "format": f, "modules": n} for (r, f), n in sorted(formats.items())],
        "gate_up_mismatches": mismatches,
        "bad_scales": bad_scales if deep else None,
        "unknown_tensors": sorted(inv.unknown),
        "ignored_layers": len(quant.get("ignored_layers", []) or []),
    }


def _scale_problems(scale: torch.Tensor) -> dict[str, int]:
    f = scale.to(torch.float32)
    return {
        "nan": int(torch.isnan(f).sum()),
        "inf": int(torch.isinf(f).sum()),
        "negative": int((f < 0).sum()),
        "zero": int((f == 0).sum()),
    }
