"""Planning: from an inventory and a policy, every output tensor, its producer, its shard, and the
fate of every input tensor. Nothing is written and no tensor data is read here (except the scalar
global scales the inventory already holds), so ``plan`` is cheap and ``run`` can be checked against
it before a byte is written.

An ``OutputTensor`` says how to make one output tensor from source tensors (``op``):

- ``copy``: the bytes of one source tensor, unchanged.
- ``bf16``: the source linear decoded to float32 (NVFP4, FP8 block or dense) and rounded to BF16.
- ``fp8_weight`` / ``fp8_scale``: the float32 source quantized with 128x128 power-of-two blocks.
- ``fold_scale``: an NVFP4 ``weight_scale`` times ``value`` (< 1), rounded to e4m3 (trap 6).
- ``scalar``: the float32 scalar ``value`` (a folded ``weight_scale_2``; an MTP expert's ``2^m`` or ``input_scale``).
- ``restate``: the first source (a parameter of a module kept as routed expert) re-encoded exactly into the output
  shape by its format (``Format.restate``; the other sources are the module's tensors its format is recognised by),
  then, where ``value`` is set, folded as ``fold_scale`` (an expert half whose gate/up global scales differ).
- ``mx_nvfp4_weight`` / ``mx_nvfp4_scale``: an MTP routed expert in MXFP4 (or a BF16 cast of it, recovered) re-encoded
  as NVFP4 under the global scale ``2^value`` (``codecs.mxfp4_to_nvfp4``): E2M1 bytes kept, block scales ``2^(k-m)``.

Every source tensor gets exactly one ``Account`` (what happened to it and why); ``build_plan``
asserts that. ``ignored_layers`` lists, in native names, every module vLLM must build unquantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .codecs import (
    FOLD_MAX_REL_ERROR,
    counts_requantized,
    counts_top_exponent,
    fold_block_scales,
    gate_up_fold,
    nvfp4_global_exponent,
)
from .errors import ConvertError
from .formats import DENSE, FORMATS, FP8_BLOCK_FORMAT, NVFP4, PRE_QUANT_SCALE
from .formats import nvfp4 as nvfp4_format
from .inventory import Inventory, Module, Role
from .mtp import exponent_counts
from .policy import Policy, Target
from .safetensors_io import OutEntry, TensorInfo, read_tensor

DEFAULT_SHARD_BYTES = 5 * 1000**3


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: name, safetensors dtype, shape, and how to produce it from its sources."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    op: str
    sources: tuple[TensorInfo, ...]
    value: float | None = None

    @property
    def entry(self) -> OutEntry:
        return OutEntry(self.name, self.dtype, self.shape)

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes


@dataclass(frozen=True)
class Account:
    """What happened to one source tensor."""

    source: str
    action: str  # copied renamed dequantized quantized re-encoded consumed rescaled dropped passed-unknown
    outputs: tuple[str, ...] = ()
    reason: str = ""
    role: str = ""
    nbytes: int = 0
    origin: str = "source"  # "reference" for tensors taken from --attention-from


@dataclass(frozen=True)
class GateUpFix:
    """Gate and up of one expert had different global scales; the smaller half was rescaled."""

    expert: str  # native module prefix, e.g. layers.3.ffn.experts.7
    gate_scale_2: float
    up_scale_2: float
    rescaled: str  # "w1" or "w3"
    ratio: float
    scale_error: float = 0.0  # the folded block scales against the exact ones, relative over the half


@dataclass(frozen=True)
class MxReencode:
    """One MTP routed expert re-encoded from MXFP4 to NVFP4: global exponents, re-quantized 32-blocks per half."""

    expert: str  # native module prefix, e.g. mtp.0.ffn.experts.3
    gate_up_exponent: int  # m of w1 and w3 (one global scale 2^m for both)
    down_exponent: int  # m of w2
    requantized: dict[str, int] = field(default_factory=dict)  # half -> blocks > 17 binades below the top


@dataclass
class Shard:
    file: str
    outputs: list[OutputTensor]

    @property
    def entries(self) -> list[OutEntry]:
        return [o.entry for o in self.outputs]

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass
class Plan:
    source: Path
    naming: str
    policy: Policy
    outputs: list[OutputTensor]
    accounts: list[Account]
    ignored_layers: list[str]
    fixes: list[GateUpFix] = field(default_factory=list)
    reencoded: list[MxReencode] = field(default_factory=list)  # MTP routed experts, MXFP4 -> NVFP4
    notes: list[str] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    reference: Path | None = None  # --attention-from
    mtp_reference: Path | None = None  # --mtp-from (or --attention-from bringing the MTP block)
    followed_links: dict[str, str] = field(default_factory=dict)  # SRC's symlinks: name -> resolved target

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def source_bytes(self) -> int:
        return sum(a.nbytes for a in self.accounts)

    def weight_map(self) -> dict[str, str]:
        return {o.name: s.file for s in self.shards for o in s.outputs}


_DROP_INPUT_SCALE = "activation scale of {}; the FP8/BF16 output quantizes activations dynamically"
_FOLD_PRE_QUANT_SCALE = (
    "AWQ pre_quant_scale folded into the weight (its value x pre_quant_scale per input column, float32)"
)
KEPT_EXPERT_FORMAT = NVFP4  # routed experts kept quantized are written in it (vLLM's ModelOpt NVFP4 MoE)


def human_bytes(n: int) -> str:
    """``1.234 GB`` (``12.3 kB`` below 10 MB)."""
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e3:.1f} kB"


_DROP_KV_CACHE_SCALE = (
    "KV-cache scale of the source's FP8 KV-cache calibration, on k_proj/v_proj (modules DeepSeek-V4 does not have); "
    "vLLM's DeepSeek-V4 keeps its own FP8 KV cache"
)


def build_plan(inv: Inventory, policy: Policy, source: Path, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Plan:
    """The complete plan; raises ``ConvertError`` when the source cannot be served under ``policy``."""
    plan = Plan(source, inv.naming, policy, [], [], [])
    experts = {m.name: m for m in inv.linears(Role.ROUTED_EXPERT)}
    # kept as they are: an MTP expert in MXFP4 is re-encoded with its own input_scale (``_reencode_mx_expert``)
    refuse_unservable_experts(
        [m for m in experts.values() if policy.target(m) == Target.NVFP4 and m.format == NVFP4.name]
    )
    refuse_awq_scale_fused_into_the_moe_norm(inv)
    fixes: dict[str, GateUpFix | None] = {}  # per expert, decided once for both halves
    reencodes: dict[str, MxReencode] = {}
    input_scales: dict[str, float] = {}  # of the main layers' experts, for the re-encoded MTP experts
    for module in inv.modules.values():
        target = policy.target(module)
        if module.format == "tensor":
            _copy(plan, module.params[""], module.name, module.role)
        elif target == Target.NVFP4 and module.format != NVFP4.name and module.name.startswith("mtp."):
            input_scales = input_scales or main_input_scales(inv)
            _reencode_mx_expert(plan, module, experts, reencodes, input_scales)
        elif target == Target.NVFP4:
            _keep_nvfp4_expert(plan, module, experts, fixes)
        elif target == Target.COPY and not (module.format == DENSE.name and DENSE.in_output_form(module.params)):
            # vLLM holds the router (GateLinear), embedding and head in BF16: a float32 router, an NVFP4 embedding
            # or lm_head is decoded and written BF16
            _convert(plan, module, "bf16")
        elif target == Target.COPY or already_in_target(module, target):
            _copy_linear(plan, module)
        elif target == Target.BF16:
            _convert(plan, module, "bf16")
        else:
            _convert(plan, module, "fp8")
    for name, info in inv.unknown.items():
        plan.outputs.append(OutputTensor(name, info.dtype, info.shape, "copy", (info,)))
        plan.accounts.append(
            Account(
                info.name,
                "passed-unknown",
                (name,),
                "matches no rule; passed through on request",
                "unknown",
                info.nbytes,
            )
        )
    for info in inv.kv_cache_scales.values():
        plan.accounts.append(Account(info.name, "dropped", (), _DROP_KV_CACHE_SCALE, "kv_cache", info.nbytes))
    if inv.kv_cache_scales:
        plan.notes.append(
            f"the source was calibrated with an FP8 KV cache ({len(inv.kv_cache_scales)} k_scale/v_scale tensors, "
            "dropped): vLLM's DeepSeek-V4 keeps its own FP8 KV cache (fp8_ds_mla, --kv-cache-dtype fp8) whatever "
            "the checkpoint says"
        )
    plan.ignored_layers = ignored_layers(inv, policy, main_layers(inv))
    if not any(m.name.startswith("mtp.") for m in inv.modules.values()):
        plan.notes.append("no MTP block (mtp.*) in the source: nothing to convert for speculative decoding")
    if policy.bf16_wo_a:
        plan.notes.append(f"BF16 wo_a needs vLLM >= {policy.min_vllm}")
    plan.outputs.sort(key=_read_order)
    plan.shards = assign_shards(plan.outputs, shard_bytes)
    _check_accounting(inv, plan)
    return plan


def main_layers(inv: Inventory) -> int:
    """The number of main decoder layers (``layers.N``): where vLLM numbers the MTP layers from."""
    return 1 + max((m.layer for m in inv.modules.values() if m.layer is not None), default=-1)


def already_in_target(module: Module, target: Target) -> bool:
    """A BF16 linear bound for BF16, or an FP8 linear with e8m0 scales bound for FP8: bytes kept."""
    fmt = {Target.BF16: DENSE, Target.FP8: FP8_BLOCK_FORMAT}.get(target)
    return fmt is not None and module.format == fmt.name and fmt.in_output_form(module.params)


def _out_name(module: Module, param: str) -> str:
    return f"{module.name}.{param}"


def _copy(plan: Plan, info: TensorInfo, out: str, role: Role) -> None:
    plan.outputs.append(OutputTensor(out, info.dtype, info.shape, "copy", (info,)))
    action = "copied" if info.name == out else "renamed"
    plan.accounts.append(Account(info.name, action, (out,), role=role.value, nbytes=info.nbytes))


def _copy_linear(plan: Plan, module: Module) -> None:
    for param, info in module.params.items():
        _copy(plan, info, _out_name(module, param), module.role)


def decode_sources(module: Module) -> tuple[TensorInfo, ...]:
    """The tensors decoding ``module`` reads, weight first (its format's ``decode_sources``)."""
    return FORMATS[module.format].decode_sources(module.params)


def _convert(plan: Plan, module: Module, target: str) -> None:
    sources = decode_sources(module)
    rows, cols = module.shape
    weight = _out_name(module, "weight")
    if target == "bf16":
        dtype, shape = DENSE.output_tensors(rows, cols)["weight"]
        outs = [OutputTensor(weight, dtype, shape, "bf16", sources)]
        action = "dequantized" if module.format != DENSE.name else "cast"
    else:
        ops = {"weight": "fp8_weight", "scale": "fp8_scale"}
        outs = [
            OutputTensor(_out_name(module, param), dtype, shape, ops[param], sources)
            for param, (dtype, shape) in FP8_BLOCK_FORMAT.output_tensors(rows, cols).items()
        ]
        action = "quantized"
    plan.outputs.extend(outs)
    names = tuple(o.name for o in outs)
    role = module.role.value
    plan.accounts.append(
        Account(sources[0].name, action, names, f"{module.format} -> {target}", role, sources[0].nbytes)
    )
    for extra in sources[1:]:
        reason = _FOLD_PRE_QUANT_SCALE if extra.name.endswith(PRE_QUANT_SCALE) else f"scale of {sources[0].name}"
        plan.accounts.append(Account(extra.name, "consumed", names, reason, role, extra.nbytes))
    if "input_scale" in module.params:
        info = module.params["input_scale"]
        reason = _DROP_INPUT_SCALE.format(f"a {FORMATS[module.format].label} linear")
        plan.accounts.append(Account(info.name, "dropped", (), reason, role, info.nbytes))


def refuse_unservable_experts(kept: list[Module]) -> None:
    """Refuse routed experts that would be kept quantized but that vLLM's NVFP4 MoE cannot serve as they are,
    naming ModelOpt's recipe and what ``--experts bf16`` would cost instead: weight-only experts (W4A16, no
    ``input_scale``: vLLM would leave its activation scale uninitialised) and W4A8 recipes (their ``input_scale``
    is an FP8 activation scale, which vLLM would read as NVFP4's) and AWQ experts (a ``pre_quant_scale``, which
    vLLM's NVFP4 MoE would not apply; ``--experts bf16`` folds it into the BF16 weight). The error names the first
    such expert's ``pre_quant_scale`` (AWQ) or ``weight``."""
    awq = [m for m in kept if PRE_QUANT_SCALE in m.params]
    w4a8 = [m for m in kept if (m.quant_algo or "").upper().startswith("W4A8")]
    weight_only = [m for m in kept if "input_scale" not in m.params]
    for bad, what in (
        (
            awq,
            "AWQ (ModelOpt {algo}: a pre_quant_scale, per-input-channel activation smoothing that vLLM's NVFP4 MoE "
            "does not apply)",
        ),
        (w4a8, "ModelOpt {algo} (W4A8: FP8 activations; vLLM's NVFP4 MoE would read its FP8 input_scale as NVFP4's)"),
        (weight_only, "weight-only (ModelOpt {algo}, W4A16: no input_scale, which vLLM's NVFP4 MoE needs)"),
    ):
        if not bad:
            continue
        first = bad[0].params[PRE_QUANT_SCALE if bad is awq else "weight"]
        as_bf16 = sum(2 * m.shape[0] * m.shape[1] for m in kept)
        as_is = sum(m.source_bytes for m in kept)
        algo = bad[0].quant_algo or {id(awq): "NVFP4_AWQ", id(weight_only): "W4A16_NVFP4"}.get(id(bad), "W4A8")
        raise ConvertError(
            f"{len(bad)} routed expert linear(s) are {what.format(algo=algo)}: refused; convert with --experts bf16 "
            f"(routed experts dequantized to BF16: {human_bytes(as_bf16)} instead of {human_bytes(as_is)}, "
            f"{as_bf16 / max(1, as_is):.1f}x)",
            file=first.file,
            tensor=first.name,
        )


def refuse_awq_scale_fused_into_the_moe_norm(inv: Inventory) -> None:
    """Refuse an AWQ export whose MoE input scale ModelOpt's export fused into the norm before the MoE.

    ModelOpt's HF export (``fuse_prequant_layernorm``) multiplies a norm's weight by the AWQ ``pre_quant_scale`` of the
    quantized linears reading it and deletes their scales; readers it did not rescale are left reading a rescaled
    input. Before DeepSeek-V4's MoE that always includes the router (``ffn.gate``, never quantized): the checkpoint
    routes on a rescaled input, whoever serves it, and the original norm is not in the file to undo it. The sign in
    the file: a shared expert's ``w1``/``w3`` declared AWQ (``quant_algo``) with no ``pre_quant_scale`` left, which AWQ
    gives every linear it quantizes. The error names that layer's norm."""
    for name, module in inv.modules.items():
        if module.role != Role.SHARED_EXPERT or not name.endswith((".w1", ".w3")):
            continue
        if "AWQ" not in (module.quant_algo or "").upper() or PRE_QUANT_SCALE in module.params:
            continue
        prefix = name.split(".ffn.")[0]
        norm, router = inv.modules.get(f"{prefix}.ffn_norm.weight"), inv.modules.get(f"{prefix}.ffn.gate")
        where = norm.params[""] if norm is not None else module.params["weight"]
        reader = module.params["weight"].name.removesuffix(".weight")
        gate = router.params["weight"].name.removesuffix(".weight") if router is not None else f"{prefix}.ffn.gate"
        raise ConvertError(
            f"ModelOpt's AWQ export fused the MoE input's pre_quant_scale into this norm ({reader} has none left), and "
            f"the MoE router {gate} reads the same norm with weights nobody rescaled: this checkpoint routes "
            "on a rescaled input whatever serves it, and the original norm is not in the file to undo it; refused. "
            "Export with a recipe that keeps AWQ off the MLP (e.g. NVFP4_DEFAULT_CFG)",
            file=where.file,
            tensor=where.name,
        )


def _keep_nvfp4_expert(
    plan: Plan, module: Module, experts: dict[str, Module], fixes: dict[str, GateUpFix | None]
) -> None:
    fmt = FORMATS[module.format]
    restated = fmt.restated_as(KEPT_EXPERT_FORMAT, module.params)
    w = module.params["weight"]
    if restated is None:
        raise ConvertError(
            f"routed expert is {fmt.label}, not {KEPT_EXPERT_FORMAT.label}: use --experts bf16",
            file=w.file,
            tensor=w.name,
        )
    prefix, half = module.name.rsplit(".", 1)
    fix = None
    if half in ("w1", "w3"):
        if prefix not in fixes:  # reads the rescaled half's block scales: once per expert, not per half
            fixes[prefix] = _gate_up_fix(prefix, experts)
        fix = fixes[prefix]
    rescaled = fix if fix is not None and fix.rescaled == half else None  # this half's block scales are folded
    for param, info in module.params.items():
        out = _out_name(module, param)
        fold = rescaled if param == "weight_scale" else None
        if param in restated:
            dtype, shape = restated[param]
            others = tuple(t for p, t in module.params.items() if p != param)
            # restated, then folded (``value``): both elementwise on the block scales, so they commute
            ratio = fold.ratio if fold else None
            plan.outputs.append(OutputTensor(out, dtype, shape, "restate", (info, *others), ratio))
            reason = f"{fmt.label} re-encoded exactly as {KEPT_EXPERT_FORMAT.label} {list(info.shape)} -> {list(shape)}"
            reason += f"; {_fold_reason(fold)}" if fold else ""
            plan.accounts.append(Account(info.name, "rescaled", (out,), reason, module.role.value, info.nbytes))
        elif fold:
            plan.outputs.append(OutputTensor(out, info.dtype, info.shape, "fold_scale", (info,), fold.ratio))
            plan.accounts.append(
                Account(info.name, "rescaled", (out,), _fold_reason(fold), module.role.value, info.nbytes)
            )
        elif rescaled and param == "weight_scale_2":
            value = max(rescaled.gate_scale_2, rescaled.up_scale_2)
            plan.outputs.append(OutputTensor(out, "F32", info.shape, "scalar", (info,), value))
            plan.accounts.append(
                Account(
                    info.name,
                    "rescaled",
                    (out,),
                    "set to the larger global scale of gate/up",
                    module.role.value,
                    info.nbytes,
                )
            )
        else:
            _copy(plan, info, out, module.role)
    if fix and half == "w1":
        plan.fixes.append(fix)


def _fold_reason(fix: GateUpFix) -> str:
    return f"gate/up global scales differ ({fix.gate_scale_2:g} vs {fix.up_scale_2:g}): block scales x {fix.ratio:.6g}"


MX_INPUT_SCALE_NOTE = (
    "input_scale of the MTP routed experts (activation scales, absent from MXFP4) = per projection the largest of the "
    "main layers' routed experts ({values}): it only affects how often the draft is accepted, never the correctness "
    "of the output (the target model verifies every drafted token)"
)


def _reencode_mx_expert(
    plan: Plan,
    module: Module,
    experts: dict[str, Module],
    reencodes: dict[str, MxReencode],
    input_scales: dict[str, float],
) -> None:
    """An MTP routed expert half in MXFP4 (or a BF16 cast of it) as NVFP4, exactly: ``weight`` (E2M1 bytes kept),
    ``weight_scale`` (``2^(k - m)``), ``weight_scale_2`` (``2^m``, m shared by w1 and w3), ``input_scale``."""
    prefix, half = module.name.rsplit(".", 1)
    if prefix not in reencodes:
        reencodes[prefix] = _mx_reencode(prefix, experts)
        plan.reencoded.append(reencodes[prefix])
        if len(plan.reencoded) == 1:
            values = ", ".join(f"{h} {v:g}" for h, v in input_scales.items())
            plan.notes.append(MX_INPUT_SCALE_NOTE.format(values=values))
    r = reencodes[prefix]
    m = r.down_exponent if half == "w2" else r.gate_up_exponent
    sources = decode_sources(module)
    rows, cols = module.shape
    name = module.name
    outs = [
        OutputTensor(f"{name}.weight", nvfp4_format.WEIGHT_DTYPE, (rows, cols // 2), "mx_nvfp4_weight", sources, m),
        OutputTensor(
            f"{name}.weight_scale", nvfp4_format.SCALE_DTYPE, (rows, cols // 16), "mx_nvfp4_scale", sources, m
        ),
        OutputTensor(f"{name}.weight_scale_2", "F32", (), "scalar", sources, 2.0**m),
        OutputTensor(f"{name}.input_scale", "F32", (), "scalar", sources, input_scales[half]),
    ]
    plan.outputs.extend(outs)
    names = tuple(o.name for o in outs)
    lost = r.requantized.get(half, 0)
    reason = f"{module.format} -> nvfp4, global scale 2^{m}: " + (
        f"{lost} block(s) more than 17 binades below the top re-quantized" if lost else "exact (E2M1 bytes kept)"
    )
    role = module.role.value
    plan.accounts.append(Account(sources[0].name, "re-encoded", names, reason, role, sources[0].nbytes))
    for extra in sources[1:]:
        plan.accounts.append(Account(extra.name, "consumed", names, f"scale of {sources[0].name}", role, extra.nbytes))


def _mx_reencode(prefix: str, experts: dict[str, Module]) -> MxReencode:
    """Global exponents of one expert (w1 and w3 share theirs) and the blocks each half loses, from one read."""
    counts = {}
    for half in ("w1", "w3", "w2"):
        m = experts.get(f"{prefix}.{half}")
        if m is None:
            raise ConvertError(f"expert {prefix} lacks its {half} half", tensor=prefix)
        counts[half] = exponent_counts(decode_sources(m), max(1, MX_BAND_BYTES // (4 * m.shape[1])))
    gate_up = nvfp4_global_exponent(counts_top_exponent(counts["w1"]), counts_top_exponent(counts["w3"]))
    down = nvfp4_global_exponent(counts_top_exponent(counts["w2"]))
    lost = {h: counts_requantized(c, down if h == "w2" else gate_up) for h, c in counts.items()}
    return MxReencode(prefix, gate_up, down, {h: n for h, n in lost.items() if n})


MX_BAND_BYTES = 64 * 1024 * 1024  # float32 bytes of one row band read while planning a re-encode


def main_input_scales(inv: Inventory) -> dict[str, float]:
    """Per projection (w1, w2, w3), the largest ``input_scale`` of the main layers' NVFP4 routed experts."""
    out: dict[str, float] = {}
    for m in inv.linears(Role.ROUTED_EXPERT):
        if m.input_scale is not None and not m.name.startswith("mtp."):
            half = m.name.rsplit(".", 1)[1]
            out[half] = max(out.get(half, 0.0), m.input_scale)
    if set(out) != {"w1", "w2", "w3"}:
        raise ConvertError("no NVFP4 routed expert in the main layers to take the MTP experts' input_scale from")
    return dict(sorted(out.items()))


def _gate_up_fix(prefix: str, experts: dict[str, Module]) -> GateUpFix | None:
    gate, up = experts.get(f"{prefix}.w1"), experts.get(f"{prefix}.w3")
    if gate is None or up is None:
        some = (gate or up).params["weight"]  # type: ignore[union-attr]
        raise ConvertError(
            f"expert {prefix} lacks its {'w1 (gate)' if gate is None else 'w3 (up)'} half",
            file=some.file,
            tensor=some.name,
        )
    g, u = gate.global_scale, up.global_scale
    if g is None or u is None:
        return None
    fold = gate_up_fold(g, u)
    if fold is None:
        return None
    half, ratio = fold
    rescaled = "w1" if half == "gate" else "w3"
    scales = (gate if half == "gate" else up).params["weight_scale"]
    _, error = fold_block_scales(read_tensor(scales), ratio)  # decided here, before anything is written
    if error > FOLD_MAX_REL_ERROR:
        raise ConvertError(
            f"gate and up global scales differ {1 / ratio:.4g}x: folding them pushes this half's block scales "
            f"below e4m3's range ({error:.0%} off): refused; convert with --experts bf16 (exact) or re-export with "
            "equal global scales",
            file=scales.file,
            tensor=scales.name,
        )
    return GateUpFix(prefix, g, u, rescaled, ratio, error)


def ignore_names(module: Module, n_layers: int | None = None) -> list[str]:
    """The ``ignored_layers`` entries that make vLLM build ``module`` unquantized (BF16): the fused
    vLLM module and its shard names (older releases match only the fused name); none for roles
    vLLM builds without a quant config anyway (compressors, indexer ``weights_proj``).

    An MTP module (``mtp.J.*``) is spelled as vLLM builds it, ``layers.{n_layers + J}.*`` (the ``mtp.J.``
    spelling never matches); ``n_layers`` (``num_hidden_layers``) is required for one.
    """
    name = mtp_layer_name(module.name, n_layers)
    if module.role == Role.ATTENTION:
        block, _, proj = name.partition(".attn.")
        if proj in ("wq_a", "wkv"):
            return [f"{block}.attn.fused_wqa_wkv", f"{block}.attn.wq_a", f"{block}.attn.wkv"]
        return [name]
    if module.role == Role.SHARED_EXPERT:
        p = name.rsplit(".", 1)[0]
        return [f"{p}.gate_up_proj", f"{p}.w1", f"{p}.w3", f"{p}.w2"]
    if module.role == Role.ROUTED_EXPERT:
        return [f"{name.split('.ffn.experts.')[0]}.ffn.experts"]
    return []


def mtp_layer_name(name: str, n_layers: int | None) -> str:
    """``mtp.J.rest`` -> ``layers.{n_layers + J}.rest`` (vLLM's module prefix of MTP layer J); other names unchanged."""
    m = re.match(r"^mtp\.(\d+)\.", name)
    if m is None:
        return name
    if n_layers is None:
        raise ValueError(f"{name}: an MTP module needs num_hidden_layers to be named as vLLM builds it")
    return f"layers.{n_layers + int(m.group(1))}.{name[m.end() :]}"


def ignored_layers(inv: Inventory, policy: Policy, n_layers: int | None = None) -> list[str]:
    """Native module names vLLM must build unquantized (BF16) under ``policy``, in module order."""
    names = (n for m in inv.linears() if policy.target(m) == Target.BF16 for n in ignore_names(m, n_layers))
    return list(dict.fromkeys(names))


def _read_order(o: OutputTensor) -> tuple:
    """Block by block (top-level first, then layers, then MTP), and within a block in the order the
    source stores the bytes: the copies then read (and write) sequentially, not in name order."""
    m = re.match(r"^(layers|mtp)\.(\d+)\.", o.name)
    block = (0, 0) if m is None else (1 if m.group(1) == "layers" else 2, int(m.group(2)))
    src = o.sources[0]
    return (block, src.file.name, src.start)


def assign_shards(outputs: list[OutputTensor], shard_bytes: int) -> list[Shard]:
    """Greedy, order-preserving packing into shards of at most ``shard_bytes`` (a bigger tensor alone)."""
    groups: list[list[OutputTensor]] = []
    size = 0
    for o in outputs:
        if not groups or (size + o.nbytes > shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(o)
        size += o.nbytes
    n = len(groups)
    width = max(5, len(str(n)))
    return [Shard(f"model-{i + 1:0{width}d}-of-{n:0{width}d}.safetensors", g) for i, g in enumerate(groups)]


def _check_accounting(inv: Inventory, plan: Plan) -> None:
    seen: dict[str, int] = {}
    for a in plan.accounts:
        seen[a.source] = seen.get(a.source, 0) + 1
    expected = (
        {t.name for m in inv.modules.values() for t in m.params.values()}
        | {t.name for t in inv.unknown.values()}
        | {t.name for t in inv.kv_cache_scales.values()}
    )
    missing = sorted(expected - seen.keys())
    twice = sorted(n for n, c in seen.items() if c > 1)
    if missing or twice:
        raise AssertionError(f"plan accounting broken: unaccounted {missing[:5]}, accounted twice {twice[:5]}")
    names = [o.name for o in plan.outputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConvertError("two source tensors map to the same output name", tensor=dup)
