"""Planted faults: a converted (tiny) checkpoint edited in place with one known mistake.

Each fault is one of the ways a conversion went wrong before (CONTRACT.md section 4); the preflight must
FAIL on every one of them, which is what shows that it can see such a mistake at all. (Gate and up halves
swapped is not among them: with small pre-activations ``silu(g) * u`` and ``silu(u) * g`` are nearly equal,
and on the preflight's random model that swap moved no more greedy tokens than BF16 rounding does.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConvertError

if TYPE_CHECKING:  # torch is imported where a fault is planted: the CLI lists the faults without it
    from .reference import Tensors


def _matching(t: Tensors, pattern: str, what: str) -> list[str]:
    names = [n for n in t if re.fullmatch(pattern, n)]
    if not names:
        raise ConvertError(f"planted fault needs {what}, and this checkpoint has none")
    return names


def compressor_wkv_wgate_swapped(t: Tensors) -> None:
    """Trap 4's kin: every main compressor's ``wkv`` and ``wgate`` exchanged (same shapes, silently wrong)."""
    for n in _matching(t, r"layers\.\d+\.attn\.compressor\.wkv\.weight", "a compressor"):
        g = n.replace(".wkv.", ".wgate.")
        t[n], t[g] = t[g], t[n]


def wo_a_scale_ones(t: Tensors) -> None:
    """Trap 2: every FP8 ``wo_a`` block scale replaced by 1.0 (a placeholder scale)."""
    import torch

    for n in _matching(t, r"layers\.\d+\.attn\.wo_a\.scale", "FP8 wo_a (policy default or fp8)"):
        t[n] = torch.ones_like(t[n].float()).to(t[n].dtype)


def expert_global_scale_mismatch(t: Tensors) -> None:
    """Trap 6 left in: each gate half (``w1``) re-expressed with a 16x larger ``weight_scale_2`` and 16x smaller
    block scales. Decoded per tensor the weights are unchanged, but vLLM applies ``w1``'s global scale to both
    halves, so the up projection it computes is 16x too large."""
    for n in _matching(t, r"layers\.\d+\.ffn\.experts\.\d+\.w1\.weight_scale_2", "NVFP4 routed experts"):
        ws = n.removesuffix("_2")
        t[n] = t[n] * 16
        t[ws] = (t[ws].float() / 16).to(t[ws].dtype)


FAULTS: dict[str, Callable[[Tensors], None]] = {
    f.__name__: f for f in (compressor_wkv_wgate_swapped, wo_a_scale_ones, expert_global_scale_mismatch)
}


def plant(dst: Path, fault: str) -> None:
    """Edit every shard of the converted checkpoint ``dst`` in place with ``fault`` (names unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if fault not in FAULTS:
        raise ConvertError(f"unknown planted fault {fault!r} (one of {', '.join(FAULTS)})")
    shards = sorted(dst.glob("*.safetensors"))
    tensors: Tensors = {}
    where: dict[str, Path] = {}
    for f in shards:
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[k] = sf.get_tensor(k)
                where[k] = f
    FAULTS[fault](tensors)
    for f in shards:
        save_file({k: v.contiguous() for k, v in tensors.items() if where[k] == f}, f, metadata={"format": "pt"})
