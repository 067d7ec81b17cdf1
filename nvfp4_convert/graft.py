"""``--attention-from REF``: take every non-expert linear from a BF16 (or FP8-with-scales) reference.

Contract:
- REF is a checkpoint of the same model in native or transformers names, sharded or not; its
  routed experts (fused or not) are ignored: they still come from SRC, untouched.
- ``check_reference`` compares REF with SRC before anything is written: the config dimensions
  that shape the weights, and for every non-expert linear of SRC the same module in REF with the
  same [out, in] shape. Any mismatch is a ``ConvertError`` naming the module.
- ``graft`` returns the inventory to plan from (REF's modules in place of SRC's) and the SRC
  modules it replaced, which the plan accounts for as dropped with the reason.
- ``graft_errors`` measures what the graft buys: per module, the NVFP4-derived weight of SRC
  against REF (relative Frobenius error, cosine), and what was written instead (REF in the output
  format: FP8 with power-of-two block scales, or BF16) against REF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import ConvertError
from .formats import DENSE, FORMATS, FP8_BLOCK_FORMAT
from .inventory import Inventory, Module, Role, build_inventory
from .metrics import output_weight, weight_errors

GRAFTED_ROLES = {Role.ATTENTION, Role.COMPRESSOR, Role.INDEXER_WEIGHTS, Role.SHARED_EXPERT, Role.MTP_PROJ}
SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "q_lora_rank",
    "o_lora_rank",
    "o_groups",
    "moe_intermediate_size",
    "n_shared_experts",
    "index_n_heads",
    "index_head_dim",
    "vocab_size",
)
REPLACED_REASON = "replaced by the reference's weight (--attention-from)"


@dataclass
class Graft:
    inventory: Inventory  # what to plan from
    replaced: list[Module]  # SRC modules whose tensors are dropped
    reference: Inventory
    shards: list[Path] = field(default_factory=list)  # REF's files (their identity guards --resume)


def open_reference(ref: Path, *, allow_outside_links: bool = False) -> tuple[Checkpoint, Inventory]:
    ckpt = Checkpoint.open(ref, require_config=False, allow_outside_links=allow_outside_links)
    # REF's fused experts (transformers' gate_up_proj/down_proj) match no per-expert rule: not needed.
    return ckpt, build_inventory(ckpt, pass_unknown=True)


def check_dimensions(src_cfg: dict, ref_ckpt: Checkpoint, keys: tuple[str, ...] = SHAPE_KEYS) -> None:
    """Refuse a REF whose config (where it has one) differs from SRC's in one of ``keys``, naming the first."""
    ref_cfg = ref_ckpt.config
    for key in keys:
        if ref_cfg and key in src_cfg and key in ref_cfg and src_cfg[key] != ref_cfg[key]:
            raise ConvertError(
                f"reference {key} = {ref_cfg[key]!r}, source has {src_cfg[key]!r}", file=ref_ckpt.path / "config.json"
            )


def check_reference(src_cfg: dict, ref_ckpt: Checkpoint, src: Inventory, ref: Inventory) -> None:
    """Refuse a REF that is not the same model as SRC, naming the first difference."""
    check_dimensions(src_cfg, ref_ckpt)
    for m in src.linears():
        if m.role not in GRAFTED_ROLES:
            continue
        r = ref.modules.get(m.name)
        if r is None or r.format == "tensor":
            raise ConvertError(
                f"module {m.name} of the source has no weight in the reference", file=ref_ckpt.path, tensor=m.name
            )
        if not FORMATS[r.format].output:
            raise ConvertError(
                f"reference weight is {FORMATS[r.format].label}: a reference must be BF16 or FP8",
                file=ref_ckpt.path,
                tensor=r.params["weight"].name,
            )
        if r.shape != m.shape:
            raise ConvertError(
                f"shape {list(r.shape)} in the reference, {list(m.shape)} in the source",
                file=ref_ckpt.path,
                tensor=r.params["weight"].name,
            )


def graft(src_cfg: dict, src: Inventory, ref_path: Path, *, allow_outside_links: bool = False) -> Graft:
    ref_ckpt, ref = open_reference(ref_path, allow_outside_links=allow_outside_links)
    check_reference(src_cfg, ref_ckpt, src, ref)
    modules = dict(src.modules)
    replaced = []
    for name, m in src.modules.items():
        if m.format != "tensor" and m.role in GRAFTED_ROLES:
            modules[name] = ref.modules[name]
            replaced.append(m)
    return Graft(Inventory(src.naming, modules, dict(src.unknown)), replaced, ref, list(ref_ckpt.shards))


def graft_errors(g: Graft, output_ops: dict[str, str] | None = None) -> list[dict[str, float | str]]:
    """Per grafted module: the SRC-derived (NVFP4) weight against REF's; with ``output_ops`` (output tensor name ->
    plan op: ``fp8_weight`` or ``bf16``) also the written weight (REF in that format) against REF's."""
    rows: list[dict[str, float | str]] = []
    for m in g.replaced:
        ref = output_weight(g.reference.modules[m.name])
        e = weight_errors(output_weight(m), ref)
        row: dict[str, float | str] = {
            "module": m.name,
            "source_format": m.format,
            "rel_error": e["rel_error"],
            "cosine": e["cosine"],
        }
        op = (output_ops or {}).get(f"{m.name}.weight")
        if op == "fp8_weight":
            written = FP8_BLOCK_FORMAT.decode(FP8_BLOCK_FORMAT.encode(ref))
        elif op == "bf16":
            written = DENSE.decode(DENSE.encode(ref))
        elif op == "copy":  # REF already in the output format: written as it is
            written = ref
        else:
            written = None
        if written is not None:
            row["written_rel_error"] = weight_errors(written, ref)["rel_error"]
        rows.append(row)
    return rows
