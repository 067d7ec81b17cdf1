"""Every source tensor, renamed to native and grouped into modules with a role and a storage format.

The format of a linear is decided per module from the dtypes and companions on disk, never from
the config (CONTRACT.md section 1): the ``formats`` registry recognises it (``nvfp4``, ``nvfp4_32``, ``fp8``,
``fp8_tensor``, ``mxfp4``, ``dense``: see each format's module) and the format validates it. Non-linear
tensors are modules of format ``tensor`` with a single unnamed parameter.

A tensor that no naming rule covers, a quantized weight without its scales, a scale without its
weight, a dtype or shape that contradicts its role, or a NaN/Inf/negative/zero global scale raise
``ConvertError`` naming the file and tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from . import formats
from .checkpoint import Checkpoint
from .errors import ConvertError
from .naming import LINEAR_PARAMS, Naming, detect_naming, native_name
from .safetensors_io import TensorInfo


class Role(str, Enum):
    """What a module is in the model; the precision policy is keyed on it."""

    ATTENTION = "attention"  # wq_a, wkv, wq_b, wo_a, wo_b, indexer.wq_b
    COMPRESSOR = "compressor"  # (indexer.)compressor.wkv / wgate: vLLM builds them unquantized
    INDEXER_WEIGHTS = "indexer_weights_proj"  # vLLM builds it unquantized
    SHARED_EXPERT = "shared_expert"
    ROUTED_EXPERT = "routed_expert"
    MTP_PROJ = "mtp_proj"  # mtp.N.e_proj / h_proj: vLLM builds them FP8 with no prefix
    ROUTER = "router"  # ffn.gate.weight
    EMBEDDING = "embedding"
    HEAD = "head"
    NORM = "norm"
    HYPER_CONNECTION = "hyper_connection"
    OTHER = "other"  # sinks, ape, gate bias, tid2eid, ...


LINEAR_ROLES = {
    Role.ATTENTION,
    Role.COMPRESSOR,
    Role.INDEXER_WEIGHTS,
    Role.SHARED_EXPERT,
    Role.ROUTED_EXPERT,
    Role.MTP_PROJ,
}

_ROLE_RULES: list[tuple[re.Pattern[str], Role]] = [
    (re.compile(r"(^|\.)attn\.(wq_a|wkv|wq_b|wo_a|wo_b|indexer\.wq_b)$"), Role.ATTENTION),
    (re.compile(r"(^|\.)attn\.(indexer\.)?compressor\.(wkv|wgate)$"), Role.COMPRESSOR),
    (re.compile(r"(^|\.)attn\.indexer\.weights_proj$"), Role.INDEXER_WEIGHTS),
    (re.compile(r"(^|\.)ffn\.shared_experts\.w[123]$"), Role.SHARED_EXPERT),
    (re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]$"), Role.ROUTED_EXPERT),
    (re.compile(r"^mtp\.\d+\.(e_proj|h_proj)$"), Role.MTP_PROJ),
    (re.compile(r"(^|\.)ffn\.gate$"), Role.ROUTER),
]
_TENSOR_ROLE_RULES: list[tuple[re.Pattern[str], Role]] = [
    (re.compile(r"(^|\.)embed\.weight$"), Role.EMBEDDING),
    (re.compile(r"(^|\.)head\.weight$"), Role.HEAD),
    (re.compile(r"(norm|enorm|hnorm)\.weight$"), Role.NORM),
    (re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$"), Role.HYPER_CONNECTION),
]


def linear_role(module: str) -> Role | None:
    """Role of a native linear module name, ``None`` if it is not a linear."""
    return next((role for rx, role in _ROLE_RULES if rx.search(module)), None)


def tensor_role(native: str) -> Role:
    """Role of a native non-linear tensor name."""
    return next((role for rx, role in _TENSOR_ROLE_RULES if rx.search(native)), Role.OTHER)


@dataclass
class Module:
    """One linear (its parameters) or one plain tensor (parameter ``""``), in native naming."""

    name: str  # native module name (linear) or native tensor name (plain tensor)
    role: Role
    format: str  # a ``formats.FORMATS`` name ("nvfp4", "fp8", "mxfp4", "dense", ...) or "tensor"
    params: dict[str, TensorInfo] = field(default_factory=dict)  # param -> source tensor
    global_scale: float | None = None  # weight_scale_2 of an NVFP4 module (weight_scale of a per-tensor FP8 one)
    input_scale: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Logical [out, in] of a linear (its format's ``logical_shape``)."""
        return formats.FORMATS[self.format].logical_shape(self.params)

    @property
    def source_bytes(self) -> int:
        return sum(t.nbytes for t in self.params.values())

    @property
    def layer(self) -> int | None:
        m = re.match(r"^layers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    def source_names(self) -> list[str]:
        return [t.name for t in self.params.values()]


# ModelOpt's FP8 KV-cache calibration (``hf_ptq.py --kv_cache_qformat fp8``) writes a scalar ``k_scale`` / ``v_scale``
# per layer on ``k_proj`` / ``v_proj``, modules DeepSeek-V4 does not have (tests/fixtures/recipes/nvfp4-kv-fp8).
KV_CACHE_SCALE = re.compile(r"(model\.)?layers\.\d+\.self_attn\.(k_proj\.k|v_proj\.v)_scale")


@dataclass
class Inventory:
    """All modules of a source checkpoint, keyed by native name, plus tensors passed through unknown."""

    naming: Naming
    modules: dict[str, Module]
    unknown: dict[str, TensorInfo] = field(default_factory=dict)  # native-ish name -> tensor
    kv_cache_scales: dict[str, TensorInfo] = field(default_factory=dict)  # source name -> tensor (dropped)

    def linears(self, role: Role | None = None) -> list[Module]:
        return [m for m in self.modules.values() if m.format != "tensor" and (role is None or m.role == role)]

    def experts(self) -> dict[str, list[int]]:
        """Block prefix (``layers.N`` / ``mtp.N``) -> sorted routed expert ids."""
        out: dict[str, set[int]] = {}
        for m in self.linears(Role.ROUTED_EXPERT):
            block, _, rest = m.name.partition(".ffn.experts.")
            out.setdefault(block, set()).add(int(rest.split(".")[0]))
        return {k: sorted(v) for k, v in out.items()}

    def gate_up_mismatches(self) -> list[tuple[str, float, float]]:
        """NVFP4 routed experts whose gate (w1) and up (w3) global scales differ (trap 6; vLLM applies w1's to
        both): (expert module prefix, w1's ``weight_scale_2``, w3's), in module order."""
        out = []
        for gate in self.linears(Role.ROUTED_EXPERT):
            up = self.modules.get(gate.name[:-1] + "3") if gate.name.endswith(".w1") else None
            if up is None or gate.format != "nvfp4" or up.format != "nvfp4":
                continue
            assert gate.global_scale is not None and up.global_scale is not None  # set for every NVFP4 module
            if gate.global_scale != up.global_scale:
                out.append((gate.name.removesuffix(".w1"), gate.global_scale, up.global_scale))
        return out


def build_inventory(ckpt: Checkpoint, *, pass_unknown: bool = False) -> Inventory:
    """Classify every tensor of ``ckpt``; raise on anything unrecognised unless ``pass_unknown``."""
    try:
        naming = detect_naming(ckpt.tensors)
    except ValueError as e:
        raise ConvertError(str(e), file=ckpt.path) from e
    grouped: dict[str, dict[str, TensorInfo]] = {}
    plain: dict[str, TensorInfo] = {}
    unknown: dict[str, TensorInfo] = {}
    kv_scales: dict[str, TensorInfo] = {}
    for name, info in ckpt.tensors.items():
        if KV_CACHE_SCALE.fullmatch(name):
            kv_scales[name] = info
            continue
        native = native_name(name, naming)
        if native is None:
            if not pass_unknown:
                raise ConvertError("tensor matches no DeepSeek-V4 naming rule", file=info.file, tensor=name)
            unknown[name.removeprefix("model.")] = info
            continue
        module, _, param = native.rpartition(".")
        if param in LINEAR_PARAMS and linear_role(module) is not None:
            grouped.setdefault(module, {})[param] = info
        else:
            plain[native] = info
    modules: dict[str, Module] = {}
    for native, info in plain.items():
        modules[native] = Module(native, tensor_role(native), "tensor", {"": info})
    for module, params in grouped.items():
        modules[module] = _linear_module(module, params)
    return Inventory(naming, dict(sorted(modules.items(), key=lambda kv: _sort_key(kv[0]))), unknown, kv_scales)


def _sort_key(name: str) -> tuple:
    """Natural order: numbers compare as numbers, so layers.2 precedes layers.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _linear_module(module: str, params: dict[str, TensorInfo]) -> Module:
    """One linear: its format is the one its tensors claim (``formats.recognise``), validated by that format."""
    role = linear_role(module)
    assert role is not None
    weight = params.get("weight")
    if weight is None:
        some = next(iter(params.values()))
        raise ConvertError(f"{sorted(params)} present but no weight for {module}", file=some.file, tensor=some.name)
    if len(weight.shape) != 2:
        raise ConvertError(f"linear weight must be 2-D, got {list(weight.shape)}", file=weight.file, tensor=weight.name)
    fmt = formats.recognise(params)
    scalars = fmt.validate(module, params)
    return Module(module, role, fmt.name, dict(params), scalars.global_scale, scalars.input_scale)


RELEASE_FORMAT = "DeepSeek's native release format (FP8 linears, MXFP4 routed experts, E8M0 scales)"


def source_format(inv: Inventory) -> str | None:
    """``RELEASE_FORMAT`` when ``inv`` is DeepSeek's own release (native names and MXFP4 routed experts), else None
    (a ModelOpt export, a converted checkpoint, or anything else this package reads as it always has)."""
    if inv.naming == "native" and any(m.format == "mxfp4" for m in inv.linears(Role.ROUTED_EXPERT)):
        return RELEASE_FORMAT
    return None
