"""DeepSeek-V4 in DeepSeek's own release format: the tensor encodings, a writer, and a float32 model to feed it.

Input of ``write_release``: a float32 (any floating dtype is cast) state dict in DeepSeek's native names (no
``model.`` prefix; the MTP block as ``mtp.0.*``; ``ffn.gate.tid2eid`` integer) and the release's ``config.json``
dict (``release_config`` builds one from a transformers DeepseekV4Config dict). Output, in a directory:
``model-0000K-of-0000N.safetensors`` shards, ``model.safetensors.index.json`` (``metadata.total_size`` and
``weight_map``) and ``config.json``. Each tensor is stored as ``release_encoding`` says:

- ``fp8``: dense linears (``attn.wq_a/wkv/wq_b/wo_a/wo_b``, ``attn.indexer.wq_b``, ``ffn.shared_experts.w1/w2/w3``,
  ``mtp.N.e_proj/h_proj``): ``<module>.weight`` float8_e4m3fn [out, in] and ``<module>.scale`` float8_e8m0fnu
  [ceil(out/128), ceil(in/128)], power-of-two block scales ``2**ceil(log2(max(amax, 1e-4) / 448))``
  (``codecs.quantize_fp8_block``, vLLM's ``per_block_cast_to_fp8(..., use_ue8m0=True)``).
- ``mxfp4``: routed experts ``ffn.experts.E.w1/w2/w3``: ``weight`` int8 [out, in/2] (two E2M1 codes a byte, element
  2i in the low nibble) and ``scale`` float8_e8m0fnu [out, in/32] (``codecs.quantize_mxfp4``, OCP rule).
- ``bf16``: ``embed.weight``, ``head.weight``, RMSNorm weights, ``ffn.gate.weight``, the compressors' ``wkv`` and
  ``wgate`` (main and indexer; vLLM builds them with no quant config) and ``attn.indexer.weights_proj``.
- ``f32``: ``hc_*`` (``fn``, ``base``, ``scale``), ``attn.attn_sink``, compressor ``ape``, ``ffn.gate.bias``.
- ``i32``: ``ffn.gate.tid2eid``.

Those dtypes are DeepSeek's inference code's (its comments: "rmsnorm in the checkpoint is stored in bf16", "wkv and
wgate in the checkpoint is stored in bf16", "lm_head ... stored in bf16", "wo_a is FP8 in checkpoint"; float32
``hc_*``, ``attn_sink``, ``ape`` and gate ``bias``, int32 ``tid2eid``, bf16 ``indexer.weights_proj``) and match the
parameters vLLM 0.32 builds (``vllm/models/deepseek_v4/``: float32 hc/sink/ape/bias, int32 ``tid2eid``, uint8 MXFP4
experts via ``Mxfp4MoEMethod``, ``.scale`` renamed ``weight_scale_inv`` for FP8 linears and ``weight_scale`` for
experts). ``native_model_tensors`` lists every tensor name and shape a config implies (main layers and MTP), as
vLLM's modules hold them; ``random_native_state`` fills them. Used to build test fixtures, never on a checkpoint
being converted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from .codecs import quantize_fp8_block, quantize_mxfp4
from .config_emit import compress_ratios, num_hash_layers, release_rope

Encoding = Literal["fp8", "mxfp4", "bf16", "f32", "i32"]

_FP8_LINEAR = re.compile(
    r"^(?:layers|mtp)\.\d+\.(?:attn\.(?:wq_a|wkv|wq_b|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])\.weight$"
    r"|^mtp\.\d+\.[eh]_proj\.weight$"
)
_EXPERT = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]\.weight$")
_F32 = re.compile(
    r"(?:^|\.)(?:hc_(?:attn|ffn|head)_(?:fn|base|scale)|attn\.attn_sink|compressor\.ape|ffn\.gate\.bias)$"
)
_I32 = re.compile(r"\.ffn\.gate\.tid2eid$")

# DeepSeek's release config keys copied from a transformers DeepseekV4Config dict (the same names in both).
_SHARED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "qk_rope_head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "index_n_heads", "index_head_dim", "index_topk", "sliding_window",
    "max_position_embeddings", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "scoring_func",
    "routed_scaling_factor", "norm_topk_prob", "swiglu_limit", "hidden_act", "rope_theta", "compress_rope_theta",
    "bos_token_id", "eos_token_id", "tie_word_embeddings",
)  # fmt: skip
RELEASE_QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "scale_fmt": "ue8m0",
}


def release_encoding(name: str) -> Encoding:
    """How DeepSeek's release stores the tensor ``name`` (a native name; a linear's ``.weight``)."""
    if _EXPERT.match(name):
        return "mxfp4"
    if _FP8_LINEAR.match(name):
        return "fp8"
    if _I32.search(name):
        return "i32"
    if _F32.search(name):
        return "f32"
    return "bf16"


def encode_release(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's tensors for a native state dict: each FP8/MXFP4 ``X.weight`` becomes ``X.weight`` + ``X.scale``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        enc = release_encoding(name)
        if enc in ("fp8", "mxfp4"):
            module = name.removesuffix(".weight")
            if enc == "fp8":
                q, s = quantize_fp8_block(t.to(torch.float32))
                out[name], out[f"{module}.scale"] = q, s.to(torch.float8_e8m0fnu)
            else:
                out[name], out[f"{module}.scale"] = quantize_mxfp4(t.to(torch.float32))
        elif enc == "i32":
            out[name] = t.to(torch.int32).contiguous()
        else:
            out[name] = t.to(torch.float32 if enc == "f32" else torch.bfloat16).contiguous()
    return out


def release_config(source: Mapping[str, Any], *, mtp_layers: int = 1) -> dict[str, Any]:
    """The release's config.json (DeepSeek's own keys, as vLLM's DeepseekV4Config reads them) for the dimensions of
    ``source`` (a transformers DeepseekV4Config dict, or a release config): ``compress_ratios`` with one 0 per MTP
    layer at the end, ``num_hash_layers``, ``num_nextn_predict_layers``, flat YaRN ``rope_scaling``,
    ``topk_method: noaux_tc``, ``expert_dtype: fp4`` and block-FP8 ``quantization_config`` (ue8m0 scales)."""
    src = dict(source)
    src["num_nextn_predict_layers"] = mtp_layers
    n_layers = int(src["num_hidden_layers"])
    ratios = compress_ratios(src)[:n_layers] + [0] * mtp_layers
    config: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
    config |= {k: src[k] for k in _SHARED_KEYS if k in src}
    rope = release_rope(src)
    if rope is None and isinstance(src.get("rope_scaling"), dict):
        rope = src["rope_scaling"]
    if rope is not None:
        config["rope_scaling"] = rope
    config |= {
        "num_hash_layers": num_hash_layers(src),
        "num_nextn_predict_layers": mtp_layers,
        "compress_ratios": ratios,
        "topk_method": "noaux_tc",
        "expert_dtype": "fp4",
        "torch_dtype": "bfloat16",
        "quantization_config": dict(RELEASE_QUANTIZATION),
    }
    return config


def native_model_tensors(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor (native name -> float shape, linears as ``.weight`` [out, in]) of a release ``config``'s model:
    top level, ``num_hidden_layers`` layers and ``num_nextn_predict_layers`` MTP blocks. A layer's compressor exists
    for ``compress_ratios[i] > 1`` (overlapping, twice as wide, for 4), its indexer for 4; hash layers
    (``i < num_hash_layers``) have ``ffn.gate.tid2eid`` [vocab, top-k], the others ``ffn.gate.bias``; the MTP blocks
    are layers with ratio 0 and never hash-routed."""
    c = config
    h, v, hc = c["hidden_size"], c["vocab_size"], c["hc_mult"]
    shapes: dict[str, tuple[int, ...]] = {
        "embed.weight": (v, h),
        "head.weight": (v, h),
        "norm.weight": (h,),
        **_hc_head("", hc, h),
    }
    n_layers, ratios = c["num_hidden_layers"], c["compress_ratios"]
    for i in range(n_layers):
        shapes |= _layer(c, f"layers.{i}.", ratios[i], hash_routed=i < c["num_hash_layers"])
    for j in range(c.get("num_nextn_predict_layers", 0)):
        p = f"mtp.{j}."
        shapes |= {f"{p}enorm.weight": (h,), f"{p}hnorm.weight": (h,), f"{p}norm.weight": (h,)}
        shapes |= {f"{p}e_proj.weight": (h, h), f"{p}h_proj.weight": (h, h), **_hc_head(p, hc, h)}
        shapes |= _layer(c, p, 0, hash_routed=False)
    return shapes


def _hc_head(prefix: str, hc: int, h: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}hc_head_fn": (hc, hc * h), f"{prefix}hc_head_base": (hc,), f"{prefix}hc_head_scale": (1,)}


def _compressor(p: str, ratio: int, head_dim: int, h: int) -> dict[str, tuple[int, ...]]:
    width = (1 + (ratio == 4)) * head_dim
    return {
        f"{p}ape": (ratio, width),
        f"{p}wkv.weight": (width, h),
        f"{p}wgate.weight": (width, h),
        f"{p}norm.weight": (head_dim,),
    }


def _layer(c: Mapping[str, Any], p: str, ratio: int, *, hash_routed: bool) -> dict[str, tuple[int, ...]]:
    h, hc = c["hidden_size"], c["hc_mult"]
    heads, hd, q, groups, o = c["num_attention_heads"], c["head_dim"], c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]
    inter, experts = c["moe_intermediate_size"], c["n_routed_experts"]
    shared = inter * (c.get("n_shared_experts") or 1)
    mix = (2 + hc) * hc
    s: dict[str, tuple[int, ...]] = {f"{p}attn_norm.weight": (h,), f"{p}ffn_norm.weight": (h,)}
    for part in ("attn", "ffn"):
        s |= {f"{p}hc_{part}_fn": (mix, hc * h), f"{p}hc_{part}_base": (mix,), f"{p}hc_{part}_scale": (3,)}
    a = f"{p}attn."
    s |= {
        f"{a}attn_sink": (heads,),
        f"{a}wq_a.weight": (q, h),
        f"{a}q_norm.weight": (q,),
        f"{a}wq_b.weight": (heads * hd, q),
        f"{a}wkv.weight": (hd, h),
        f"{a}kv_norm.weight": (hd,),
        f"{a}wo_a.weight": (groups * o, heads * hd // groups),
        f"{a}wo_b.weight": (h, groups * o),
    }
    if ratio > 1:
        s |= _compressor(f"{a}compressor.", ratio, hd, h)
    if ratio == 4:
        ih, ihd = c["index_n_heads"], c["index_head_dim"]
        s |= {f"{a}indexer.wq_b.weight": (ih * ihd, q), f"{a}indexer.weights_proj.weight": (ih, h)}
        s |= _compressor(f"{a}indexer.compressor.", ratio, ihd, h)
    f = f"{p}ffn."
    s[f"{f}gate.weight"] = (experts, h)
    s[f"{f}gate.tid2eid" if hash_routed else f"{f}gate.bias"] = (
        (c["vocab_size"], c["num_experts_per_tok"]) if hash_routed else (experts,)
    )
    s |= {f"{f}shared_experts.w1.weight": (shared, h), f"{f}shared_experts.w3.weight": (shared, h)}
    s[f"{f}shared_experts.w2.weight"] = (h, shared)
    for e in range(experts):
        s |= {f"{f}experts.{e}.w1.weight": (inter, h), f"{f}experts.{e}.w3.weight": (inter, h)}
        s[f"{f}experts.{e}.w2.weight"] = (h, inter)
    return s


def random_native_state(
    config: Mapping[str, Any], seed: int = 0, *, main_layers: bool = True
) -> dict[str, torch.Tensor]:
    """A float32 state dict for ``native_model_tensors(config)`` (int64 ``tid2eid``: distinct valid expert ids per
    token), seeded: linears and embeddings ~N(0, 0.02) with every 128x128 block's magnitude spread over +-2 binades
    (so a wrong block scale shows), norms and hc scales ~1 +- 0.1, other plain tensors distinct and nonzero.
    ``main_layers=False``: without ``layers.*`` (the top level and the MTP blocks; other draws than with them)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    shapes = {n: s for n, s in native_model_tensors(config).items() if main_layers or not n.startswith("layers.")}
    for name, shape in shapes.items():
        if name.endswith("tid2eid"):
            vocab, top_k = shape
            rows = [torch.randperm(config["n_routed_experts"], generator=gen)[:top_k] for _ in range(vocab)]
            out[name] = torch.stack(rows).to(torch.int64)
        elif len(shape) == 2 and not re.search(r"hc_\w+_fn$|ape$", name):
            w = torch.randn(shape, generator=gen) * 0.02
            rb, cb = -(-shape[0] // 128), -(-shape[1] // 128)
            spread = torch.pow(2.0, torch.randint(-2, 3, (rb, cb), generator=gen).to(torch.float32))
            out[name] = w * spread.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
        elif re.search(r"norm\.weight$|_scale$", name):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.1 * torch.randn(shape, generator=gen)
    return out


def write_release(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], out: Path, *, max_shard_bytes: int = 2**30
) -> dict[str, torch.Tensor]:
    """Encode ``state`` (``encode_release``) and write it to ``out`` (created; existing files overwritten) as shards
    of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own; ``<module>.weight`` and its ``.scale``
    may land in different shards, as in the release), the index and ``config``. Returns the written tensors."""
    tensors = encode_release(state)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)
    return tensors


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
