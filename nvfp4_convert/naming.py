"""Tensor names: transformers' DeepSeek-V4 names (ModelOpt export) to DeepSeek's native names (vLLM).

Contract (CONTRACT.md section 2): ``to_native`` is the inverse of the ``deepseek_v4`` entry of
transformers' ``conversion_mapping.py``; the test suite checks it against that list. A name that
no rule covers maps to ``None``: the caller must stop, never guess.

Native names carry no ``model.`` prefix (vLLM's own mapper adds it). An MTP block is ``mtp.N.*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

Naming = Literal["transformers", "native"]

# Parameters of a (possibly ModelOpt-quantized) linear module (``pre_quant_scale``: ModelOpt AWQ).
LINEAR_PARAMS = ("weight", "weight_scale", "weight_scale_2", "input_scale", "scale", "pre_quant_scale")
_P = f"({'|'.join(LINEAR_PARAMS)})"

# Linear modules inside one decoder layer: transformers path -> native path.
_LAYER_LINEARS: dict[str, str] = {
    "self_attn.q_a_proj": "attn.wq_a",
    "self_attn.q_b_proj": "attn.wq_b",
    "self_attn.kv_proj": "attn.wkv",
    "self_attn.o_a_proj": "attn.wo_a",
    "self_attn.o_b_proj": "attn.wo_b",
    "self_attn.compressor.kv_proj": "attn.compressor.wkv",
    "self_attn.compressor.gate_proj": "attn.compressor.wgate",
    "self_attn.compressor.indexer.kv_proj": "attn.indexer.compressor.wkv",
    "self_attn.compressor.indexer.gate_proj": "attn.indexer.compressor.wgate",
    "self_attn.compressor.indexer.q_b_proj": "attn.indexer.wq_b",
    "self_attn.compressor.indexer.scorer.weights_proj": "attn.indexer.weights_proj",
    "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1",
    "mlp.shared_experts.up_proj": "ffn.shared_experts.w3",
    "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
    "mlp.gate": "ffn.gate",  # the router: a plain weight, no quantization
}

# Plain (non-linear) tensors inside one decoder layer: full transformers suffix -> native suffix.
_LAYER_PLAIN: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
}

_EXPERT_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

# Top-level tensors (full transformers name -> native name).
_TOP: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}

# MTP-only tensors (relative to ``mtp.N.``), already native in every known export.
_MTP_OWN = re.compile(
    rf"^(?:(?:e_proj|h_proj)\.{_P}|(?:enorm|hnorm|norm)\.weight|hc_head_(?:fn|base|scale)"
    r"|shared_head\.(?:norm|head)\.weight|embed\.weight|head\.weight)$"
)

# Top-level modules ModelOpt can quantize (an NVFP4 embedding / lm_head): their scales, transformers -> native.
_TOP_MODULES: dict[str, str] = {"model.embed_tokens": "embed", "lm_head": "head"}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^(?:model\.)?mtp\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(rf"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.{_P}$")
_LINEAR_RE = re.compile(rf"^(.+)\.{_P}$")


def _layer_rest_to_native(rest: str) -> str | None:
    """Map the part of a transformers name after ``layers.N.`` to its native form."""
    if rest in _LAYER_PLAIN:
        return _LAYER_PLAIN[rest]
    m = _EXPERT_RE.match(rest)
    if m:
        return f"ffn.experts.{m.group(1)}.{_EXPERT_PROJ[m.group(2)]}.{m.group(3)}"
    m = _LINEAR_RE.match(rest)
    if m and m.group(1) in _LAYER_LINEARS:
        return f"{_LAYER_LINEARS[m.group(1)]}.{m.group(2)}"
    return None


def to_native(name: str) -> str | None:
    """Native DeepSeek name of a transformers-named tensor, or ``None`` when no rule covers it."""
    if name in _TOP:
        return _TOP[name]
    m = _LINEAR_RE.match(name)
    if m and m.group(1) in _TOP_MODULES:
        return f"{_TOP_MODULES[m.group(1)]}.{m.group(2)}"
    m = _LAYER_RE.match(name)
    if m:
        rest = _layer_rest_to_native(m.group(2))
        return f"layers.{m.group(1)}.{rest}" if rest else None
    m = _MTP_RE.match(name)
    if m:
        idx, rest = m.groups()
        if _MTP_OWN.match(rest):
            return f"mtp.{idx}.{rest}"
        native_rest = _layer_rest_to_native(rest)
        if native_rest is None and _is_native_layer_rest(rest):
            native_rest = rest
        return f"mtp.{idx}.{native_rest}" if native_rest else None
    return None


# Native names, for input that is already native and for validating output.
_NATIVE_LAYER_LINEARS = set(_LAYER_LINEARS.values())
_NATIVE_LAYER_PLAIN = set(_LAYER_PLAIN.values())
_NATIVE_EXPERT_RE = re.compile(rf"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.{_P}$")
_NATIVE_TOP = set(_TOP.values())
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def _is_native_layer_rest(rest: str) -> bool:
    """True when ``rest`` (after ``layers.N.``) is a native DeepSeek-V4 layer tensor name."""
    if rest in _NATIVE_LAYER_PLAIN or _NATIVE_EXPERT_RE.match(rest):
        return True
    m = _LINEAR_RE.match(rest)
    return bool(m and m.group(1) in _NATIVE_LAYER_LINEARS)


def is_native(name: str) -> bool:
    """True when ``name`` is a tensor name of DeepSeek's native release layout."""
    if name in _NATIVE_TOP:
        return True
    m = _LINEAR_RE.match(name)
    if m and m.group(1) in _TOP_MODULES.values():
        return True
    m = _NATIVE_LAYER_RE.match(name)
    if m:
        return _is_native_layer_rest(m.group(2))
    m = _MTP_RE.match(name)
    if m and not name.startswith("model."):
        return bool(_MTP_OWN.match(m.group(2)) or _is_native_layer_rest(m.group(2)))
    return False


def detect_naming(names: Iterable[str]) -> Naming:
    """Which naming a checkpoint uses, by the landmark tensors it holds."""
    names = set(names)
    if any(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in names):
        return "transformers"
    if any(n.startswith("layers.") or n == "embed.weight" for n in names):
        return "native"
    raise ValueError("neither transformers (model.layers.*) nor native (layers.*) DeepSeek-V4 names found")


def native_name(name: str, naming: Naming) -> str | None:
    """Native name of ``name`` under ``naming``; ``None`` when it is not a known DeepSeek-V4 tensor."""
    if naming == "native":
        return name if is_native(name) else None
    return to_native(name)
