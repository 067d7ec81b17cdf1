"""Every source tensor, renamed to native and grouped into modules with a role and a storage format.

The format of a linear is decided per module from the dtypes and companions on disk, never from
the config (CONTRACT.md section 1): ``nvfp4`` = uint8 ``weight`` + e4m3 ``weight_scale`` [out, in/16]
+ float32 scalar ``weight_scale_2`` (+ optional ``input_scale``); ``fp8`` = e4m3 ``weight`` + e8m0 or
float32 ``scale`` [ceil(out/128), ceil(in/128)]; ``mxfp4`` (DeepSeek's own release, routed experts) = int8
``weight`` [out, in/2] + e8m0 ``scale`` [out, in/32]; ``dense`` = a floating ``weight`` alone. Non-linear
tensors are modules of format ``tensor`` with a single unnamed parameter.

A tensor that no naming rule covers, a quantized weight without its scales, a scale without its
weight, a dtype or shape that contradicts its role, or a NaN/Inf/negative/zero global scale raise
``ConvertError`` naming the file and tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import torch

from .checkpoint import Checkpoint
from .codecs import FP4_BLOCK, MX_BLOCK, fp8_scale_shape
from .errors import ConvertError
from .naming import LINEAR_PARAMS, Naming, detect_naming, native_name
from .safetensors_io import TensorInfo, read_tensor


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
_FLOAT_DTYPES = {"BF16", "F16", "F32"}


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
    format: str  # "nvfp4" | "fp8" | "mxfp4" | "dense" | "tensor"
    params: dict[str, TensorInfo] = field(default_factory=dict)  # param -> source tensor
    global_scale: float | None = None  # weight_scale_2 of an NVFP4 module
    input_scale: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Logical [out, in] of a linear."""
        w = self.params["weight"]
        return (w.shape[0], w.shape[1] * 2) if self.format in ("nvfp4", "mxfp4") else (w.shape[0], w.shape[1])

    @property
    def source_bytes(self) -> int:
        return sum(t.nbytes for t in self.params.values())

    @property
    def layer(self) -> int | None:
        m = re.match(r"^layers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    def source_names(self) -> list[str]:
        return [t.name for t in self.params.values()]


@dataclass
class Inventory:
    """All modules of a source checkpoint, keyed by native name, plus tensors passed through unknown."""

    naming: Naming
    modules: dict[str, Module]
    unknown: dict[str, TensorInfo] = field(default_factory=dict)  # native-ish name -> tensor

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
    for name, info in ckpt.tensors.items():
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
    return Inventory(naming, dict(sorted(modules.items(), key=lambda kv: _sort_key(kv[0]))), unknown)


def _sort_key(name: str) -> tuple:
    """Natural order: numbers compare as numbers, so layers.2 precedes layers.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _linear_module(module: str, params: dict[str, TensorInfo]) -> Module:
    role = linear_role(module)
    assert role is not None
    weight = params.get("weight")
    if weight is None:
        some = next(iter(params.values()))
        raise ConvertError(f"{sorted(params)} present but no weight for {module}", file=some.file, tensor=some.name)
    if len(weight.shape) != 2:
        raise ConvertError(f"linear weight must be 2-D, got {list(weight.shape)}", file=weight.file, tensor=weight.name)
    if weight.dtype == "U8":
        return _nvfp4_module(module, role, params)
    if weight.dtype == "F8_E4M3":
        return _fp8_module(module, role, params)
    if weight.dtype == "I8":
        return _mxfp4_module(module, role, params)
    if weight.dtype in _FLOAT_DTYPES:
        extra = sorted(set(params) - {"weight"})
        if extra:
            t = params[extra[0]]
            raise ConvertError(
                f"{weight.dtype} weight with quantization companion {extra[0]}", file=t.file, tensor=t.name
            )
        return Module(module, role, "dense", dict(params))
    raise ConvertError(f"unsupported linear weight dtype {weight.dtype}", file=weight.file, tensor=weight.name)


def _nvfp4_module(module: str, role: Role, params: dict[str, TensorInfo]) -> Module:
    weight = params["weight"]
    for needed in ("weight_scale", "weight_scale_2"):
        if needed not in params:
            raise ConvertError(f"NVFP4 (uint8) weight without its {needed}", file=weight.file, tensor=weight.name)
    if "scale" in params:
        t = params["scale"]
        raise ConvertError("FP8 'scale' beside an NVFP4 weight", file=t.file, tensor=t.name)
    out, half_in = weight.shape
    ws, ws2 = params["weight_scale"], params["weight_scale_2"]
    if ws.dtype != "F8_E4M3":
        raise ConvertError(f"weight_scale must be F8_E4M3, got {ws.dtype}", file=ws.file, tensor=ws.name)
    if (half_in * 2) % FP4_BLOCK or ws.shape != (out, half_in * 2 // FP4_BLOCK):
        raise ConvertError(
            f"weight_scale shape {list(ws.shape)} != [{out}, {half_in * 2 // FP4_BLOCK}] for weight {list(weight.shape)}",
            file=ws.file,
            tensor=ws.name,
        )
    mod = Module(module, role, "nvfp4", dict(params))
    mod.global_scale = _positive_scalar(ws2)
    if "input_scale" in params:
        mod.input_scale = _positive_scalar(params["input_scale"])
    return mod


def _fp8_module(module: str, role: Role, params: dict[str, TensorInfo]) -> Module:
    weight = params["weight"]
    scale = params.get("scale")
    if scale is None:
        raise ConvertError("FP8 weight without its block 'scale'", file=weight.file, tensor=weight.name)
    if scale.dtype not in ("F8_E8M0", "F32"):
        raise ConvertError(
            f"FP8 block scale must be F8_E8M0 or F32, got {scale.dtype}", file=scale.file, tensor=scale.name
        )
    expected = fp8_scale_shape(*weight.shape)
    if scale.shape != expected:
        raise ConvertError(f"scale shape {list(scale.shape)} != {list(expected)}", file=scale.file, tensor=scale.name)
    extra = sorted(set(params) - {"weight", "scale"})
    if extra:
        t = params[extra[0]]
        raise ConvertError(f"unexpected {extra[0]} beside an FP8 weight", file=t.file, tensor=t.name)
    return Module(module, role, "fp8", dict(params))


def _mxfp4_module(module: str, role: Role, params: dict[str, TensorInfo]) -> Module:
    """DeepSeek's release MXFP4: int8 ``weight`` [out, in/2] + E8M0 ``scale`` [out, in/32], nothing else."""
    weight = params["weight"]
    scale = params.get("scale")
    if scale is None:
        raise ConvertError("MXFP4 (int8) weight without its E8M0 'scale'", file=weight.file, tensor=weight.name)
    if scale.dtype not in ("F8_E8M0", "U8"):
        raise ConvertError(f"MXFP4 scale must be F8_E8M0, got {scale.dtype}", file=scale.file, tensor=scale.name)
    out, half_in = weight.shape
    if (half_in * 2) % MX_BLOCK or scale.shape != (out, half_in * 2 // MX_BLOCK):
        raise ConvertError(
            f"scale shape {list(scale.shape)} != [{out}, {half_in * 2 // MX_BLOCK}] for weight {list(weight.shape)}",
            file=scale.file,
            tensor=scale.name,
        )
    extra = sorted(set(params) - {"weight", "scale"})
    if extra:
        t = params[extra[0]]
        raise ConvertError(f"unexpected {extra[0]} beside an MXFP4 weight", file=t.file, tensor=t.name)
    return Module(module, role, "mxfp4", dict(params))


RELEASE_FORMAT = "DeepSeek's native release format (FP8 linears, MXFP4 routed experts, E8M0 scales)"


def source_format(inv: Inventory) -> str | None:
    """``RELEASE_FORMAT`` when ``inv`` is DeepSeek's own release (native names and MXFP4 routed experts), else None
    (a ModelOpt export, a converted checkpoint, or anything else this package reads as it always has)."""
    if inv.naming == "native" and any(m.format == "mxfp4" for m in inv.linears(Role.ROUTED_EXPERT)):
        return RELEASE_FORMAT
    return None


def _positive_scalar(info: TensorInfo) -> float:
    if info.dtype != "F32" or info.numel != 1:
        raise ConvertError(
            f"must be a float32 scalar, got {info.dtype}{list(info.shape)}", file=info.file, tensor=info.name
        )
    value = float(read_tensor(info).reshape(()).item())
    if not (value > 0 and torch.isfinite(torch.tensor(value))):
        raise ConvertError(f"scale is {value}: must be finite and > 0", file=info.file, tensor=info.name)
    return value
