"""Every source tensor, renamed to native and grouped into modules with a role and a storage format.

The format of a linear is decided per module from the dtypes and companions on disk, never from
the config (CONTRACT.md section 1): the ``formats`` registry recognises it (``nvfp4`` and its block sizes, ``fp8``,
``fp8_tensor``, ``mxfp4``, ``dense``: see each format's module) and the format validates it. Non-linear
tensors are modules of format ``tensor`` with a single unnamed parameter.

The embedding and ``lm_head`` are plain tensors, or, when ModelOpt quantized them (scales beside the weight), modules
of role ``embedding`` / ``head`` in the format their tensors claim. A linear may carry ModelOpt AWQ's
``pre_quant_scale`` beside its format's tensors (checked here, folded where it is decoded: ``formats.base``). Each module records the algorithm ModelOpt's
``quantization_config`` declares for it (``quant_algo``: ``NVFP4``, ``W4A16_NVFP4``, ``W4A8_NVFP4_FP8``, ...), which
planning uses to name a recipe it refuses.

A tensor that no naming rule covers (a ModelOpt tensor kind this converter does not handle is named as such), a
quantized weight without its scales, a scale without its weight, a dtype or shape that contradicts its role, or a
NaN/Inf/negative/zero global scale raise ``ConvertError`` naming the file and tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from . import formats
from .checkpoint import Checkpoint
from .errors import ConvertError
from .formats.base import check_pre_quant_scale
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
    quant_algo: str | None = None  # what ModelOpt's quantization_config declares for it (``modelopt_algo``)

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


# Tensor kinds ModelOpt's export writes that have no place in DeepSeek-V4's layout (``modelopt.torch.export``:
# ``quantizer_attr_names`` and ``postprocess_state_dict``): suffix -> what it is. A source holding one stops, named.
MODELOPT_KINDS: dict[str, str] = {
    "pre_quant_scale": "AWQ/SmoothQuant pre_quant_scale (per-input-channel activation smoothing; recipes "
    "NVFP4_AWQ, INT4_AWQ, W4A8_AWQ, INT8_SQ) on a module that is no linear: not converted",
    "output_scale": "output activation scale: not converted",
    "k_bias": "KV-cache quantization bias (affine KV cache): not converted",
    "v_bias": "KV-cache quantization bias (affine KV cache): not converted",
    "weight_scale": "weight quantization scale on a module this converter knows only unquantized: not converted",
    "weight_scale_2": "NVFP4 global scale on a module this converter knows only unquantized: not converted",
    "input_scale": "activation scale on a module this converter knows only unquantized: not converted",
}

# Modules outside the decoder layers that ModelOpt may quantize (``recipes/nvfp4-embed-lm-head``), native names.
QUANTIZABLE_TENSORS = {"embed": Role.EMBEDDING, "head": Role.HEAD}


def modelopt_algo(config: dict, name: str) -> str | None:
    """The ``quant_algo`` ModelOpt's ``quantization_config`` declares for the module of transformers name ``name``
    (``quantized_layers`` lists routed experts under the fused ``mlp.experts``: the nearest listed parent counts), else
    the checkpoint-wide ``quant_algo`` unless that is ``MIXED_PRECISION``; ``None`` when the config says nothing."""
    q = config.get("quantization_config") or {}
    if not isinstance(q, dict):
        return None
    layers = q.get("quantized_layers") or {}
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        entry = layers.get(".".join(parts[:n])) if isinstance(layers, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("quant_algo"), str):
            return entry["quant_algo"]
    algo = q.get("quant_algo")
    return algo if isinstance(algo, str) and algo != "MIXED_PRECISION" else None


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
                raise ConvertError(_unknown_what(name, ckpt.config), file=info.file, tensor=name)
            unknown[name.removeprefix("model.")] = info
            continue
        module, _, param = native.rpartition(".")
        if param in LINEAR_PARAMS and (linear_role(module) is not None or module in QUANTIZABLE_TENSORS):
            grouped.setdefault(module, {})[param] = info
        else:
            plain[native] = info
    for module in [m for m in QUANTIZABLE_TENSORS if set(grouped.get(m, {})) == {"weight"}]:
        plain[f"{module}.weight"] = grouped.pop(module)["weight"]  # unquantized: a plain tensor, as always
    modules: dict[str, Module] = {}
    for native, info in plain.items():
        modules[native] = Module(native, tensor_role(native), "tensor", {"": info})
    for module, params in grouped.items():
        modules[module] = _linear_module(module, params, ckpt.config)
    return Inventory(naming, dict(sorted(modules.items(), key=lambda kv: _sort_key(kv[0]))), unknown, kv_scales)


def _sort_key(name: str) -> tuple:
    """Natural order: numbers compare as numbers, so layers.2 precedes layers.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _unknown_what(name: str, config: dict) -> str:
    """Why a tensor has no place: the ModelOpt tensor kind it is (and the algorithm declared for its module), or no
    naming rule at all."""
    module, _, kind = name.rpartition(".")
    if kind not in MODELOPT_KINDS:
        return "tensor matches no DeepSeek-V4 naming rule"
    algo = modelopt_algo(config, module)
    return f"ModelOpt {kind} on {module}" + (f" (quant_algo {algo})" if algo else "") + f": {MODELOPT_KINDS[kind]}"


def _linear_module(module: str, params: dict[str, TensorInfo], config: dict | None = None) -> Module:
    """One linear (or a quantized embedding/head): its format is the one its tensors claim (``formats.recognise``),
    validated by that format."""
    role = linear_role(module) or QUANTIZABLE_TENSORS.get(module)
    assert role is not None
    weight = params.get("weight")
    if weight is None:
        some = next(iter(params.values()))
        raise ConvertError(f"{sorted(params)} present but no weight for {module}", file=some.file, tensor=some.name)
    if len(weight.shape) != 2:
        raise ConvertError(f"linear weight must be 2-D, got {list(weight.shape)}", file=weight.file, tensor=weight.name)
    own = {p: info for p, info in params.items() if p != formats.PRE_QUANT_SCALE}  # the format's tensors
    fmt = formats.recognise(own)
    scalars = fmt.validate(module, own)
    awq = params.get(formats.PRE_QUANT_SCALE)
    if awq is not None:  # ModelOpt AWQ: folded into the weight wherever it is decoded (``formats.base``)
        if role == Role.EMBEDDING:
            raise ConvertError("pre_quant_scale on an embedding: not converted", file=awq.file, tensor=awq.name)
        check_pre_quant_scale(awq, fmt.logical_shape(own)[1])
    algo = modelopt_algo(config or {}, weight.name.removesuffix(".weight"))
    return Module(module, role, fmt.name, dict(params), scalars.global_scale, scalars.input_scale, algo)


RELEASE_FORMAT = "DeepSeek's native release format (FP8 linears, MXFP4 routed experts, E8M0 scales)"


def source_format(inv: Inventory) -> str | None:
    """``RELEASE_FORMAT`` when ``inv`` is DeepSeek's own release (native names and MXFP4 routed experts), else None
    (a ModelOpt export, a converted checkpoint, or anything else this package reads as it always has)."""
    if inv.naming == "native" and any(m.format == "mxfp4" for m in inv.linears(Role.ROUTED_EXPERT)):
        return RELEASE_FORMAT
    return None
