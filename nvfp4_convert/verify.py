"""``verify``: is a converted checkpoint what stock vLLM needs, and does it hold the source's weights?

Three layers of checks, each a list of ``Finding`` (check, tensor, ok, detail, metrics):

- ``check_structure(dst)``: finished (not an unfinished run); index consistent with the shards;
  config.json in vLLM's form; native names only; no stale NVFP4 tensor outside the routed experts;
  FP8 weights with ``float8_e8m0fnu`` power-of-two ``scale`` of the right shape; every module
  vLLM builds (from the config: layers, compress ratios, hash layers, experts) has its tensors;
  ``ignored_layers`` lists exactly the BF16 modules; NVFP4 experts' gate/up global scales equal.
  Needs no vLLM; when vLLM is importable, every name also goes through its own weight mapper (asked from a child
  process, ``vllm_names``, while the other checks run).
- ``check_against_source(dst, src)``: each output tensor against the source it came from (the plan
  for the policy recorded in the report): copies byte-equal, BF16 equal to the dequantized source
  bit for bit (zero signs aside), FP8 within e4m3's rounding of the float32 source.
- ``check_against_reference(dst, ref)``: each linear vs a BF16 reference of the same model:
  relative Frobenius error, cosine, max abs error, and the relative error of ``x @ W.T``.

Everything streams per tensor; ``sample`` limits the rows per tensor and the experts per layer. Decoding is the
formats' (``formats``), the error metrics ``metrics``' (``weight_errors`` and ``output_weight`` are re-exported).
"""

from __future__ import annotations

import bisect
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .codecs import E4M3_MIN_EXP, FP8_BLOCK, fp8_scale_shape, is_power_of_two
from .config_emit import quantization_config
from .convert import prepare_from_report
from .direct_io import Range, differences, read_from_cache
from .errors import ConvertError
from .formats import DENSE, FORMATS, FP8_BLOCK_FORMAT, NVFP4, PRE_QUANT_SCALE, decode_rows, of_sources
from .formats import nvfp4 as nvfp4_format
from .inventory import Inventory, Module, Role, build_inventory
from .metrics import output_weight, weight_errors
from .naming import Naming, detect_naming, native_name
from .options import Thresholds
from .plan import OutputTensor, ignore_names, mtp_layer_name
from .report import REPORT_JSON
from .safetensors_io import TensorInfo, read_rows, read_tensor
from .state import dst_status
from .vllm_names import DroppedNames

__all__ = [
    "Finding",
    "Thresholds",
    "check_against_reference",
    "check_against_source",
    "check_structure",
    "output_weight",
    "verify",
    "weight_errors",
]


@dataclass
class Finding:
    check: str
    tensor: str
    _: KW_ONLY  # the verdict and what follows are named at every call
    ok: bool
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


# --- structure ------------------------------------------------------------------------------------


def check_structure(dst: Path, *, dropped: DroppedNames | None = None) -> list[Finding]:
    """``dropped``: vLLM's mapper already started on DST's names (``mapper_check``); else started here."""
    out: list[Finding] = []
    status = dst_status(dst)
    out.append(Finding("finished", str(dst), ok=status == "finished", detail=f"destination is {status}"))
    try:
        ckpt = Checkpoint.open(dst)
        inv = build_inventory(ckpt, pass_unknown=True)
    except ConvertError as e:
        return [*out, Finding("readable", e.tensor or str(dst), ok=False, detail=str(e))]
    out += _check_index(ckpt)
    out += _check_config(ckpt.config)
    out += [Finding("native names", name, ok=False, detail="not a native DeepSeek-V4 name") for name in inv.unknown]
    if inv.naming != "native":
        out.append(Finding("native names", str(dst), ok=False, detail=f"{inv.naming} names"))
    for m in inv.linears():
        out += _check_module_format(m)
    out += _check_expected_modules(inv, ckpt.config)
    out += _check_ignored_layers(inv, ckpt.config)
    out += _check_gate_up(inv)
    out += _check_vllm_mapper(dropped or _dropped_names(ckpt))
    return out


def _check_index(ckpt: Checkpoint) -> list[Finding]:
    index = ckpt.path / "model.safetensors.index.json"
    if not index.exists():
        return [Finding("index", str(index), ok=False, detail="missing")]
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
    return [
        Finding(
            "index",
            index.name,
            ok=total == ckpt.total_bytes,
            detail=f"total_size {total}, tensors hold {ckpt.total_bytes}",
        )
    ]


def _check_config(cfg: dict[str, Any]) -> list[Finding]:
    q = cfg.get("quantization_config") or {}
    want = {k: v for k, v in quantization_config([]).items() if k != "ignored_layers"}  # checked on its own
    out = [
        Finding("config", f"quantization_config.{k}", ok=q.get(k) == v, detail=f"{q.get(k)!r}, want {v!r}")
        for k, v in want.items()
    ]
    out.append(
        Finding("config", "topk_method", ok=cfg.get("topk_method") == "noaux_tc", detail=repr(cfg.get("topk_method")))
    )
    out.append(
        Finding(
            "config", "expert_dtype", ok=cfg.get("expert_dtype", "fp4") == "fp4", detail=repr(cfg.get("expert_dtype"))
        )
    )
    out.append(
        Finding("config", "mlp_layer_types", ok="mlp_layer_types" not in cfg, detail="must be absent for vLLM <= 0.32")
    )
    n = int(cfg.get("num_hidden_layers", 0)) + int(cfg.get("num_nextn_predict_layers") or 0)
    ratios = cfg.get("compress_ratios") or []
    out.append(
        Finding("config", "compress_ratios", ok=len(ratios) >= n, detail=f"{len(ratios)} entries for {n} layers")
    )
    out.append(
        Finding(
            "config",
            "num_hash_layers",
            ok=isinstance(cfg.get("num_hash_layers"), int),
            detail=repr(cfg.get("num_hash_layers")),
        )
    )
    return out


def _check_module_format(m: Module) -> list[Finding]:
    awq = m.params.get(PRE_QUANT_SCALE)
    if awq is not None:
        return [Finding("no pre_quant_scale", awq.name, ok=False, detail="AWQ scale left on a module: vLLM ignores it")]
    expert = m.role == Role.ROUTED_EXPERT
    fmt = FORMATS[m.format]
    if not fmt.output and not (expert and fmt is NVFP4):
        scale = next((t for p, t in m.params.items() if p != "weight"), m.params["weight"])
        return [
            Finding(
                f"no stale {fmt.label}",
                scale.name,
                ok=False,
                detail=f"{fmt.label} tensors left on a module vLLM builds as "
                + ("NVFP4 (block 16) or BF16" if expert else "FP8/BF16"),
            )
        ]
    if m.format == FP8_BLOCK_FORMAT.name:
        scale = m.params["scale"]
        if not FP8_BLOCK_FORMAT.in_output_form(m.params):
            return [
                Finding("fp8 scale dtype", scale.name, ok=False, detail=f"{scale.dtype}, want F8_E8M0 (float8_e8m0fnu)")
            ]
        if scale.shape != fp8_scale_shape(*m.params["weight"].shape):
            return [Finding("fp8 scale shape", scale.name, ok=False, detail=f"{list(scale.shape)}")]
        pow2 = bool(is_power_of_two(read_tensor(scale)).all())
        return [
            Finding(
                "fp8 scale power of two", scale.name, ok=pow2, detail="" if pow2 else "a scale is not a power of two"
            )
        ]
    if m.format == DENSE.name and not DENSE.in_output_form(m.params):
        return [Finding("bf16", m.params["weight"].name, ok=False, detail=f"{m.params['weight'].dtype}, want BF16")]
    return []


def expected_tensors(cfg: dict[str, Any]) -> list[str]:
    """Native names every decoder layer must provide, from the config (MTP not included)."""
    names = ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"]
    ratios = cfg.get("compress_ratios") or []
    n_hash = int(cfg.get("num_hash_layers") or 0)
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"layers.{i}"
        names += [
            f"{p}.attn_norm.weight",
            f"{p}.ffn_norm.weight",
            f"{p}.attn.q_norm.weight",
            f"{p}.attn.kv_norm.weight",
        ]
        names += [f"{p}.hc_{a}_{b}" for a in ("attn", "ffn") for b in ("fn", "base", "scale")]
        names += [f"{p}.attn.{w}.weight" for w in ("wq_a", "wkv", "wq_b", "wo_a", "wo_b")] + [f"{p}.attn.attn_sink"]
        names += [f"{p}.ffn.gate.weight", f"{p}.ffn.gate.tid2eid" if i < n_hash else f"{p}.ffn.gate.bias"]
        names += [f"{p}.ffn.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        names += [
            f"{p}.ffn.experts.{e}.{w}.weight" for e in range(int(cfg["n_routed_experts"])) for w in ("w1", "w2", "w3")
        ]
        ratio = int(ratios[i]) if i < len(ratios) else 0
        comps = ["attn.compressor"] + (["attn.indexer.compressor"] if ratio == 4 else []) if ratio else []
        for c in comps:
            names += [f"{p}.{c}.wkv.weight", f"{p}.{c}.wgate.weight", f"{p}.{c}.ape", f"{p}.{c}.norm.weight"]
        if ratio == 4:
            names += [f"{p}.attn.indexer.wq_b.weight", f"{p}.attn.indexer.weights_proj.weight"]
    return names


def _check_expected_modules(inv: Inventory, cfg: dict[str, Any]) -> list[Finding]:
    present = {f"{m.name}.{p}" if p else m.name for m in inv.modules.values() for p in m.params}
    try:
        wanted = expected_tensors(cfg)
    except (KeyError, ValueError) as e:
        return [Finding("complete", "config.json", ok=False, detail=f"cannot derive the expected modules: {e}")]
    out = [
        Finding("complete", n, ok=False, detail="missing: vLLM would leave this parameter uninitialised")
        for n in wanted
        if n not in present
    ]
    for m in inv.linears(Role.ROUTED_EXPERT):
        if m.format == NVFP4.name:
            out += [
                Finding("complete", f"{m.name}.{p}", ok=False, detail="NVFP4 expert tensor missing")
                for p in nvfp4_format.PARAMS[1:]
                if p not in m.params
            ]
    return out or [Finding("complete", "all modules", ok=True, detail=f"{len(wanted)} expected tensors present")]


def bf16_modules_needing_ignore(inv: Inventory, n_layers: int | None = None) -> set[str]:
    """Native names that must be in ``ignored_layers`` given the formats on disk (MTP modules as ``layers.{N+J}``)."""
    return {n for m in inv.linears() if m.format == DENSE.name for n in ignore_names(m, n_layers)}


def _check_ignored_layers(inv: Inventory, cfg: dict[str, Any]) -> list[Finding]:
    listed = set((cfg.get("quantization_config") or {}).get("ignored_layers") or [])
    need = bf16_modules_needing_ignore(inv, cfg.get("num_hidden_layers"))
    out = [
        Finding(
            "ignored_layers", n, ok=False, detail="BF16 module missing from ignored_layers: vLLM would build it FP8"
        )
        for n in sorted(need - listed)
    ]
    n_layers = cfg.get("num_hidden_layers")
    fp8 = {mtp_layer_name(m.name, n_layers) for m in inv.linears() if m.format == FP8_BLOCK_FORMAT.name}
    out += [
        Finding("ignored_layers", n, ok=False, detail="FP8 module listed in ignored_layers: vLLM would build it BF16")
        for n in sorted(listed & fp8)
    ]
    return out or [
        Finding(
            "ignored_layers", "quantization_config", ok=True, detail=f"{len(listed)} entries match the BF16 modules"
        )
    ]


def _check_gate_up(inv: Inventory) -> list[Finding]:
    return [
        Finding("gate/up global scale", expert, ok=False, detail=f"w1 {g:g} != w3 {u:g}: vLLM applies w1's to both")
        for expert, g, u in inv.gate_up_mismatches()
    ]


def _check_vllm_mapper(dropped: DroppedNames) -> list[Finding]:
    """vLLM's ``hf_to_vllm_mapper`` on every name (``vllm_names``; none where vLLM is not importable here)."""
    names = dropped.result()
    if names is None:
        return []
    return [Finding("vllm mapper", n, ok=False, detail="vLLM's weight mapper drops this name") for n in names] or [
        Finding("vllm mapper", "all names", ok=True, detail="every name maps through vLLM's hf_to_vllm_mapper")
    ]


def mapper_check(dst: Path, *, release: bool = False) -> DroppedNames | None:
    """vLLM's mapper started on DST's names (``_dropped_names``), or None when DST's index cannot be read
    (``check_structure`` says why)."""
    try:
        return _dropped_names(Checkpoint.open(dst), release=release)
    except ConvertError:
        return None


def _dropped_names(ckpt: Checkpoint, *, release: bool = False) -> DroppedNames:
    """vLLM's main-model mapper asked about every name but the MTP block's (vLLM's MTP model maps those)."""
    return DroppedNames((n for n in ckpt.tensors if not n.startswith("mtp.")), release=release)


# --- against the source ---------------------------------------------------------------------------


BAND_FLOATS = 2 * 1024 * 1024  # float32 values per decoded band of a converted tensor (8 MB)


def _rows(info: TensorInfo, sample: int | None, cols: int | None = None) -> list[tuple[int, int]]:
    """Row bands to compare: ``sample`` bands of 128 rows spread over the tensor, or every row in bands
    of about ``BAND_FLOATS`` values (multiples of 128 rows: whole FP8 blocks), so memory stays bounded.
    ``cols``: the values a row decodes to (default: the tensor's own row length)."""
    rows = info.shape[0] if info.shape else 1
    if len(info.shape) < 2:
        return [(0, rows)]
    if not sample:
        cols = cols or max(1, info.numel // max(1, rows))
        step = max(1, BAND_FLOATS // cols // FP8_BLOCK) * FP8_BLOCK
        return [(r, min(rows, r + step)) for r in range(0, rows, step)]
    if rows <= sample * FP8_BLOCK:
        return [(0, rows)]
    step = max(1, (rows // FP8_BLOCK) // sample) * FP8_BLOCK
    return [(r, min(rows, r + FP8_BLOCK)) for r in range(0, rows, step)][:sample]


class SourceComparison:
    """``check_against_source``, started early: the byte comparison of the copies (most of the bytes,
    I/O-bound) runs on a thread from construction on, while ``findings()`` decodes the converted
    tensors (CPU-bound) and other checks run."""

    def __init__(self, dst: Path, src: Path, *, sample: int | None = None, allow_outside_links: bool = False) -> None:
        self.sample = sample
        self.out_ckpt = Checkpoint.open(dst)
        # the plan the run executed: its policy and the references it took tensors from (the report's ``inputs``)
        self.prep = prepare_from_report(
            src, json.loads((dst / REPORT_JSON).read_text()), allow_outside_links=allow_outside_links
        )
        self.src_ckpt, self.plan = self.prep.ckpt, self.prep.plan
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="compare-copies")
        self._copies = None if sample else self._pool.submit(_differing_copies, self.plan.outputs, self.out_ckpt)
        self._pool.shutdown(wait=False)

    def findings(self) -> list[Finding]:
        plan, out_ckpt, sample = self.plan, self.out_ckpt, self.sample
        expected_config = self.prep.config
        taken = {k: v for k, v in self.prep.inputs.items() if k.endswith("_from") and v}
        findings = [
            Finding(
                "plan rebuilt",
                str(self.src_ckpt.path),
                ok=True,
                detail="from DST's report: "
                + (", ".join(f"--{k.replace('_', '-')} {v}" for k, v in taken.items()) or "the policy alone"),
            ),
            Finding(
                "config vs source",
                "config.json",
                ok=expected_config == out_ckpt.config,
                detail="matches the plan"
                if expected_config == out_ckpt.config
                else "differs from what the plan writes",
            ),
        ]
        copies: list[tuple[int, str]] = []  # (position in findings, tensor): filled once the comparison is done
        seen_experts: dict[str, int] = {}
        for o in plan.outputs:
            got = out_ckpt.tensors.get(o.name)
            if got is None:
                findings.append(Finding("vs source", o.name, ok=False, detail="missing from the output"))
                continue
            if (got.dtype, got.shape) != (o.dtype, o.shape):
                findings.append(
                    Finding(
                        "vs source",
                        o.name,
                        ok=False,
                        detail=f"{got.dtype}{list(got.shape)}, want {o.dtype}{list(o.shape)}",
                    )
                )
                continue
            if sample and ".ffn.experts." in o.name:
                block = o.name.split(".ffn.experts.")[0]
                expert = int(o.name.split(".ffn.experts.")[1].split(".")[0])
                seen_experts.setdefault(block, expert)
                if expert - seen_experts[block] >= sample:
                    continue
            if o.op == "copy" and self._copies is not None:
                copies.append((len(findings), o.name))
                findings.append(Finding(_BYTES, o.name, ok=True))
                continue
            findings.append(_compare(o, got, out_ckpt, sample))
        if self._copies is not None:
            differing = self._copies.result()
            for at, name in copies:
                if name in differing:
                    findings[at] = Finding(_BYTES, name, ok=False, detail="bytes differ from the source")
        extra = sorted(set(out_ckpt.tensors) - {o.name for o in plan.outputs})
        findings += [
            Finding("vs source", n, ok=False, detail="in the output but not in the plan (stale or foreign)")
            for n in extra
        ]
        return findings


def check_against_source(dst: Path, src: Path, *, sample: int | None = None) -> list[Finding]:
    return SourceComparison(dst, src, sample=sample).findings()


_BYTES = "vs source: bytes"


def _differing_copies(outputs: list[OutputTensor], out_ckpt: Checkpoint) -> set[str]:
    """The copied tensors whose bytes differ from their source's, all compared in large sequential
    reads of both sides at once (``direct_io.differences``): runs of tensors back to back in both
    files are one read each, with ``O_DIRECT`` unless the file is wholly in the page cache."""
    runs: list[list[tuple[TensorInfo, TensorInfo]]] = []
    for o in outputs:
        got = out_ckpt.tensors.get(o.name)
        if o.op != "copy" or got is None or got.nbytes != o.sources[0].nbytes:
            continue
        src = o.sources[0]
        if runs:
            last_src, last_got = runs[-1][-1]
            if (last_src.file, last_src.end, last_got.file, last_got.end) == (src.file, src.start, got.file, got.start):
                runs[-1].append((src, got))
                continue
        runs.append([(src, got)])
    left = [Range(r[0][0].file, r[0][0].start, r[-1][0].end - r[0][0].start) for r in runs]
    right = [Range(r[0][1].file, r[0][1].start, r[-1][1].end - r[0][1].start) for r in runs]
    files = {x.path for x in left + right}
    cached = read_from_cache(files)
    differing: set[str] = set()
    for i, offsets in differences(left, right, cached=cached):
        ends = [got.end - runs[i][0][1].start for _, got in runs[i]]
        differing.update(runs[i][k][1].name for k in set(bisect.bisect_right(ends, int(x)) for x in offsets))
    return differing


def _per_element(block_scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Each 128x128 block's scale at each of its elements (the last blocks cut to ``rows`` x ``cols``)."""
    return block_scales.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _compare(o: OutputTensor, got: TensorInfo, out_ckpt: Checkpoint, sample: int | None) -> Finding:
    if o.op == "copy":
        same = all(_same_bytes(read_rows(got, a, b), read_rows(o.sources[0], a, b)) for a, b in _rows(got, sample))
        return Finding(_BYTES, o.name, ok=same, detail="" if same else "bytes differ from the source")
    if o.op == "bf16":
        worst = 0
        for a, b in _rows(got, sample):
            want = decode_rows(o.sources, a, b).to(torch.bfloat16)
            have = read_rows(got, a, b)
            bad = (have.view(torch.int16) != want.view(torch.int16)) & ~((have == 0) & (want == 0))
            worst += int(bad.sum())
        return Finding("vs source: bf16 exact", o.name, ok=worst == 0, detail=f"{worst} values differ" if worst else "")
    if o.op == "fp8_weight":
        scale = out_ckpt.tensors.get(o.name.removesuffix(".weight") + ".scale")
        if scale is None:
            return Finding("vs source: fp8", o.name, ok=False, detail="FP8 weight without its scale")
        worst = 0.0
        for a, b in _rows(got, sample):
            x = decode_rows(o.sources, a, b)
            s = read_rows(scale, a // FP8_BLOCK, -(-b // FP8_BLOCK))
            back = FP8_BLOCK_FORMAT.decode({"weight": read_rows(got, a, b), "scale": s})
            # e4m3 rounds to 2^-4 relative (normals), 2^-10 of the block's own scale absolute (subnormals)
            block_scale = _per_element(s.float(), *x.shape)
            ratio = (back - x).abs() / (x.abs() * 2**-4 + block_scale * 2**-10)
            worst = max(worst, float(torch.nan_to_num(ratio, nan=float("inf")).max()))  # NaN fails, never hides
        return Finding(
            "vs source: fp8 within e4m3",
            o.name,
            ok=worst <= 1.0,
            detail=f"error {worst:.3g}x the e4m3 bound",
            metrics={"bound_ratio": worst},
        )
    if o.op == "fp8_scale":
        return Finding("vs source: fp8 scale", o.name, ok=True, detail="checked with its weight")
    if o.op == "mx_nvfp4_weight":
        return _compare_reencoded(o, got, out_ckpt, sample)
    if o.op == "mx_nvfp4_scale":
        return Finding("vs source: mxfp4 -> nvfp4", o.name, ok=True, detail="checked with its weight")
    if o.op == "fold_scale" or (o.op == "restate" and o.value is not None):
        want = read_tensor(o.sources[0])
        if o.op == "restate":  # restated (exact), then folded
            want = of_sources(o.sources)[0].restate(o.sources[0].name.rpartition(".")[2], want, o.shape)
        have, want = read_tensor(got).to(torch.float32), want.to(torch.float32) * float(o.value or 1)
        ok = have.shape == want.shape and bool(((have - want).abs() <= want.abs() * 2**-4 + 2**-9).all())
        return Finding("vs source: folded scale", o.name, ok=ok, detail="" if ok else "rescaled block scales off")
    if o.op == "restate":  # the whole module decoded from the output equals the source's, bit for bit
        module = o.name.rpartition(".")[0]
        written = tuple(out_ckpt.tensors.get(f"{module}.{t.name.rpartition('.')[2]}") for t in o.sources)
        if any(t is None for t in written):
            return Finding("vs source: restated", o.name, ok=False, detail="a tensor of its module is missing")
        fmt, params = of_sources(o.sources)
        rows = fmt.logical_shape(params)[0]
        same = torch.equal(decode_rows(written, 0, rows), decode_rows(o.sources, 0, rows))  # type: ignore[arg-type]
        return Finding("vs source: restated", o.name, ok=same, detail="" if same else "decoded values differ")
    have_value = float(read_tensor(got).reshape(-1)[0])
    return Finding("vs source: scalar", o.name, ok=have_value == o.value, detail=f"{have_value} vs {o.value}")


def _compare_reencoded(o: OutputTensor, got: TensorInfo, out_ckpt: Checkpoint, sample: int | None) -> Finding:
    """An MTP expert re-encoded from MXFP4 (or a BF16 cast of it): the NVFP4 the output holds, decoded, equals the
    source's values exactly, except in blocks too small for the global scale ``2^m`` (``o.value``), re-quantized by
    contract: there every value is at most ``3 * 2^(m-9)`` and rounded to the nearest step of ``2^(m-9)``."""
    module = o.name.removesuffix(".weight")
    ws, ws2 = (out_ckpt.tensors.get(f"{module}.{p}") for p in ("weight_scale", "weight_scale_2"))
    if ws is None or ws2 is None:
        return Finding("vs source: mxfp4 -> nvfp4", o.name, ok=False, detail="weight_scale(_2) missing")
    floor = 2.0 ** (int(o.value or 0) + E4M3_MIN_EXP)  # the smallest block scale under the global scale
    global_scale = read_tensor(ws2)
    requantized = bad = 0
    for a, b in _rows(got, sample, NVFP4.logical_shape({"weight": got})[1]):
        want = decode_rows(o.sources, a, b)
        have = NVFP4.decode(
            {"weight": read_rows(got, a, b), "weight_scale": read_rows(ws, a, b), "weight_scale_2": global_scale}
        )
        differ = (have != want).reshape(want.shape[0], -1, 16)
        if not bool(differ.any()):
            continue
        small = want.abs().reshape(differ.shape).amax(dim=2, keepdim=True) <= 3 * floor
        near = ((have - want).abs() <= floor / 2).reshape(differ.shape)
        requantized += int((differ & small & near).sum())
        bad += int((differ & ~(small & near)).sum())
    detail = (
        f"{bad} values differ" if bad else "exact" + (f"; {requantized} values re-quantized" if requantized else "")
    )
    return Finding("vs source: mxfp4 -> nvfp4", o.name, ok=bad == 0, detail=detail)


# --- against a BF16 reference ---------------------------------------------------------------------


def _reference_tensors(ref: Path) -> tuple[Checkpoint, dict[str, tuple[TensorInfo, int | None, slice | None]]]:
    """Native weight name -> (reference tensor, expert index into a fused tensor, row slice)."""
    ckpt = Checkpoint.open(ref, require_config=False)
    try:
        naming: Naming = detect_naming(ckpt.tensors)
    except ValueError:  # no landmark: no weight will be found, and each linear says so
        naming = "transformers"
    table: dict[str, tuple[TensorInfo, int | None, slice | None]] = {}
    for name, info in ckpt.tensors.items():
        fused = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if fused:  # transformers' fused experts: [E, 2I, H] (gate rows first) / [E, H, I]
            layer, kind = fused.groups()
            for e in range(info.shape[0]):
                p = f"layers.{layer}.ffn.experts.{e}"
                if kind == "down_proj":
                    table[f"{p}.w2.weight"] = (info, e, None)
                else:
                    half = info.shape[1] // 2
                    table[f"{p}.w1.weight"] = (info, e, slice(0, half))
                    table[f"{p}.w3.weight"] = (info, e, slice(half, 2 * half))
            continue
        native = native_name(name, naming)
        if native is not None:
            table[native] = (info, None, None)
    return ckpt, table


def _reference_weight(entry: tuple[TensorInfo, int | None, slice | None]) -> torch.Tensor:
    info, expert, rows = entry
    if expert is None:
        return read_tensor(info).to(torch.float32)
    per = info.nbytes // info.shape[0]
    sub = TensorInfo(
        info.name, info.dtype, info.shape[1:], info.file, info.start + expert * per, info.start + (expert + 1) * per
    )
    w = read_tensor(sub).to(torch.float32)
    return w[rows] if rows is not None else w


def check_against_reference(
    dst: Path, ref: Path, *, thresholds: Thresholds | None = None, sample: int | None = None
) -> list[Finding]:
    t = thresholds or Thresholds()
    inv = build_inventory(Checkpoint.open(dst), pass_unknown=True)
    _, table = _reference_tensors(ref)
    findings = []
    for m in inv.linears():
        if m.role == Role.ROUTED_EXPERT and sample and int(m.name.split(".ffn.experts.")[1].split(".")[0]) >= sample:
            continue
        entry = table.get(f"{m.name}.weight")
        if entry is None:
            findings.append(Finding("vs reference", m.name, ok=False, detail="no such weight in the reference"))
            continue
        w, r = output_weight(m), _reference_weight(entry)
        if w.shape != r.shape:
            findings.append(
                Finding("vs reference", m.name, ok=False, detail=f"shape {list(w.shape)} vs reference {list(r.shape)}")
            )
            continue
        e = weight_errors(w, r)
        ok = (
            e["rel_error"] <= t.max_rel_error
            and e["cosine"] >= t.min_cosine
            and e["matmul_rel_error"] <= t.max_matmul_rel_error
        )
        findings.append(Finding("vs reference", m.name, ok=ok, detail=f"{m.format}", metrics=e))
    return findings


# --- the whole verification -----------------------------------------------------------------------


def verify(
    dst: Path,
    *,
    source: Path | None = None,
    reference: Path | None = None,
    sample: int | None = None,
    thresholds: Thresholds | None = None,
    allow_outside_links: bool = False,
    release_vllm: bool = False,
) -> dict[str, Any]:
    """All requested checks; ``result["ok"]`` is the verdict. ``allow_outside_links``: follow symlinks of SRC (and of
    the references the run took tensors from) that resolve outside them, as ``run --allow-outside-links`` did; it is
    the caller's to give, never read from DST's report. ``release_vllm``: end vLLM's child process as soon as it has
    answered, rather than keep it for the next call (the CLI: its memory is not held while the tensors are decoded)."""
    # Three things at once: vLLM's mapper on DST's names in a child process (seconds of import, for the structure),
    # the copies compared byte for byte (I/O) and the converted tensors decoded (CPU); the structure is checked last,
    # its findings listed first.
    dropped = mapper_check(dst, release=release_vllm)
    comparison = None
    if source is not None and (dst / REPORT_JSON).exists():  # the byte comparison starts here, on its thread
        comparison = SourceComparison(dst, source, sample=sample, allow_outside_links=allow_outside_links)
    if release_vllm and dropped is not None:
        dropped.result()  # vLLM's child answers and ends before a tensor is decoded: never both memories at once
    against = comparison.findings() if comparison else []
    findings = check_structure(dst, dropped=dropped)
    structure_ok = all(f.ok for f in findings)
    findings += against
    if reference is not None and structure_ok:
        findings += check_against_reference(dst, reference, thresholds=thresholds, sample=sample)
    failed = [f for f in findings if not f.ok]
    return {
        "destination": str(dst),
        "ok": not failed,
        "checks": len(findings),
        "failed": len(failed),
        "findings": [asdict(f) for f in sorted(findings, key=_worst_first)],
    }


def _worst_first(f: Finding) -> tuple:
    return (f.ok, -f.metrics.get("rel_error", f.metrics.get("bound_ratio", 0.0)), f.check, f.tensor)
