"""``--mtp-from REF``: the whole MTP block (``mtp.J.*``) from DeepSeek's release (FP8 + MXFP4) or a BF16 cast of it.

Contract:
- REF is DeepSeek's native release format or a BF16 cast of it, in native or transformers names, sharded or not. Only
  its ``mtp.J.*`` tensors that the block needs are read; every other REF tensor is not read (REF is a reference).
- ``take_mtp`` refuses before anything is written, naming REF: no MTP block, a tensor of the block missing or of
  another shape than SRC's ``config.json`` implies (``model_shapes.expected_mtp_shapes``), a config dimension that
  differs from SRC's, a dense linear that is neither BF16 nor FP8, a routed expert that is neither MXFP4, BF16 nor
  NVFP4. A partial block would load uninitialised memory silently in vLLM: the block is written whole or not at all.
- Planning (``plan.build_plan``) gives the block's dense parts the policy's formats (REF's FP8 bytes kept where the
  target is FP8) and its routed experts ``--mtp-experts``' format: NVFP4 re-encoded exactly from MXFP4 (``mx_rows``
  then ``codecs.mxfp4_to_nvfp4``; a BF16 cast's 32-blocks first recovered exactly, ``codecs.recover_mxfp4``), or BF16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .codecs import mxfp4_exponent_counts, recover_mxfp4
from .errors import ConvertError
from .formats import DENSE, FORMATS, MXFP4, NVFP4, of_sources
from .graft import SHAPE_KEYS, check_dimensions, open_reference
from .inventory import Inventory, Module, Role
from .model_shapes import expected_mtp_shapes
from .safetensors_io import TensorInfo, read_rows

MTP_SHAPE_KEYS = (*SHAPE_KEYS, "n_routed_experts", "hc_mult")
MTP_REPLACED_REASON = "replaced by the reference's MTP block (--mtp-from)"
EXPERT_FORMATS = (MXFP4.name, DENSE.name, NVFP4.name)


@dataclass
class MtpBlock:
    """The MTP block taken from REF: its modules (native names) to plan from, and what they replace in SRC."""

    reference: Path
    modules: dict[str, Module]
    layers: int  # MTP blocks taken: the output's num_nextn_predict_layers
    replaced: list[Module] = field(default_factory=list)  # SRC's own mtp.* modules, dropped
    unread: int = 0  # REF mtp.* tensors the block does not need (not read)
    shards: list[Path] = field(default_factory=list)  # REF's files (their identity guards --resume)


def has_mtp(inv: Inventory) -> bool:
    return any(name.startswith("mtp.") for name in inv.modules)


def take_mtp(
    src_cfg: dict, src: Inventory, ref_path: Path, *, required: bool = True, allow_outside_links: bool = False
) -> MtpBlock | None:
    """REF's MTP block, checked against SRC's config; ``required=False``: None where REF has no ``mtp.*`` at all."""
    ref_ckpt, ref = open_reference(ref_path, allow_outside_links=allow_outside_links)
    blocks = sorted({int(name.split(".")[1]) for name in ref.modules if name.startswith("mtp.")})
    if not blocks:
        if not required:
            return None
        raise ConvertError("the reference has no MTP block (no mtp.* tensor): nothing to take", file=ref_ckpt.path)
    if blocks != list(range(len(blocks))):
        raise ConvertError(f"the reference's MTP blocks are {blocks}, not mtp.0 .. mtp.N", file=ref_ckpt.path)
    check_dimensions(src_cfg, ref_ckpt, MTP_SHAPE_KEYS)
    modules: dict[str, Module] = {}
    for j in blocks:
        for name, shape in expected_mtp_shapes(src_cfg, j).items():
            module = _reference_module(ref, name, shape, ref_ckpt.path)
            modules[module.name] = module
    used = {t.name for m in modules.values() for t in m.params.values()}
    unread = sum(1 for m in ref.modules.values() if m.name.startswith("mtp.") for t in m.params.values())
    replaced = [m for name, m in src.modules.items() if name.startswith("mtp.")]
    return MtpBlock(ref_ckpt.path, modules, len(blocks), replaced, unread - len(used), list(ref_ckpt.shards))


def _reference_module(ref: Inventory, name: str, shape: tuple[int, ...], ref_path: Path) -> Module:
    """REF's module holding tensor ``name`` (a linear's ``.weight`` or a plain tensor), checked: present, the
    expected shape, a format the block can be written from."""
    module = ref.modules.get(name.removesuffix(".weight")) or ref.modules.get(name)
    if module is None:
        raise ConvertError("the reference's MTP block lacks this tensor", file=ref_path, tensor=name)
    first = next(iter(module.params.values()))
    have = tuple(module.shape) if module.format != "tensor" else tuple(first.shape)
    if have != shape:
        raise ConvertError(
            f"shape {list(have)} in the reference, the source's config.json implies {list(shape)}",
            file=ref_path,
            tensor=first.name,
        )
    if module.format == "tensor":
        return module
    if module.role == Role.ROUTED_EXPERT:
        if module.format not in EXPERT_FORMATS:
            raise ConvertError(
                f"MTP routed expert is {FORMATS[module.format].label}: --mtp-from needs MXFP4 or a BF16 cast of it",
                file=ref_path,
                tensor=first.name,
            )
        if module.format == DENSE.name and shape[1] % 32:
            raise ConvertError(f"{shape[1]} columns: not an MXFP4 cast (32-blocks)", file=ref_path, tensor=first.name)
    elif not FORMATS[module.format].output:
        raise ConvertError(
            f"reference weight is {FORMATS[module.format].label}: a reference must be BF16 or FP8",
            file=ref_path,
            tensor=first.name,
        )
    return module


def mx_rows(sources: tuple[TensorInfo, ...], r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[r0, r1)`` of a routed expert in MXFP4 form (packed int8, E8M0 scales): MXFP4 read as it is, a BF16
    (or F16/F32) cast recovered exactly (``recover_mxfp4``; a value that is no MXFP4 value raises, naming it)."""
    fmt, params = of_sources(sources)
    weight = params["weight"]
    if fmt is MXFP4:
        return read_rows(weight, r0, r1), read_rows(params["scale"], r0, r1)
    if fmt is not DENSE:
        raise ConvertError(f"{fmt.label} is neither MXFP4 nor a BF16 cast of it", file=weight.file, tensor=weight.name)
    x = read_rows(weight, r0, r1)
    try:
        return recover_mxfp4(x if x.dtype == torch.bfloat16 else x.to(torch.float32), name=weight.name)
    except ConvertError as e:
        raise ConvertError(
            e.what + (f" (band from row {r0})" if r0 else ""), file=weight.file, tensor=weight.name
        ) from e


def exponent_counts(sources: tuple[TensorInfo, ...], band_rows: int) -> torch.Tensor:
    """``codecs.mxfp4_exponent_counts`` of a whole routed expert (MXFP4 or a BF16 cast), read ``band_rows`` at a time."""
    rows = sources[0].shape[0]
    counts = torch.zeros(255, dtype=torch.int64)
    for r0 in range(0, rows, band_rows):
        counts += mxfp4_exponent_counts(*mx_rows(sources, r0, min(rows, r0 + band_rows)), name=sources[0].name)
    return counts
