"""config.json and hf_quant_config.json of the output (CONTRACT.md section 3).

``vllm_config``: the source config minus ``mlp_layer_types`` and ModelOpt's ``quantization_config``,
plus ``compress_ratios`` (one per layer from ``layer_types``: sliding 0, compressed-sparse 4,
heavily-compressed 128, and 0 for each MTP layer), ``num_hash_layers`` (the ``hash_moe`` entries),
``topk_method: noaux_tc``, ``expert_dtype: fp4`` and the block-FP8 ``quantization_config`` with
``moe_quant_algo: NVFP4`` and the plan's ``ignored_layers``. Keys already in DeepSeek's own form
(``compress_ratios``, ``num_hash_layers``) are kept; a config with neither form stops the run.

RoPE is written in DeepSeek's release form (``release_rope``): one flat dict, YaRN for the compressed
layers, plain RoPE for the sliding ones, beside ``rope_theta`` and ``compress_rope_theta``. transformers'
nested ``rope_parameters`` (``{"main": ..., "compress": ...}``) is read by vLLM >= 0.32 only; vLLM 0.26's
``build_deepseek_v4_rope`` (``vllm/models/deepseek_v4/common/rope.py``) indexes the top-level dict
(``TypeError: unhashable type: 'dict'`` in ``get_rope``), and its ``fused_inv_rope_fp8_quant`` asserts a
float32 cos/sin cache, which only its ``deepseek_yarn`` type builds. The flat form is what every release
(and transformers, which nests it again) reads from DeepSeek's own checkpoint; a plain-RoPE source becomes
YaRN with factor 1, the same frequencies.

``hf_quant_config``: what ModelOpt's own DeepSeek-V4 exporter writes (MIXED_PRECISION, NVFP4
routed experts in ``quantized_layers``, BF16 modules in ``exclude_modules``), read by SGLang.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .errors import ConvertError

COMPRESS_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
HASH_MOE = "hash_moe"


def compress_ratios(config: dict[str, Any]) -> list[int]:
    """One compress ratio per decoder layer, then one (0: sliding) per MTP layer."""
    n_layers = config.get("num_hidden_layers")
    n_mtp = int(config.get("num_nextn_predict_layers") or 0)
    if "layer_types" in config:
        rates = config.get("compress_rates") or {}  # the source's own rates, where it states them
        table = {
            **COMPRESS_RATIO,
            **{t: int(r) for t, r in rates.items() if t in COMPRESS_RATIO and t != "sliding_attention"},
        }
        try:
            ratios = [table[t] for t in config["layer_types"]]
        except KeyError as e:
            raise ConvertError(f"unknown layer type {e.args[0]!r} in layer_types", file="config.json") from e
        return ratios + [0] * n_mtp
    if "compress_ratios" in config:
        ratios = [int(r) for r in config["compress_ratios"]]
        if n_layers is not None and len(ratios) < n_layers + n_mtp:
            ratios += [0] * (n_layers + n_mtp - len(ratios))
        return ratios
    raise ConvertError("neither layer_types nor compress_ratios: cannot derive compress_ratios", file="config.json")


def num_hash_layers(config: dict[str, Any]) -> int:
    """Number of hash-routed MoE layers (they come first)."""
    if "mlp_layer_types" in config:
        types = config["mlp_layer_types"]
        n = sum(1 for t in types if t == HASH_MOE)
        if types[:n] != [HASH_MOE] * n:
            raise ConvertError("hash_moe layers are not the first layers: vLLM cannot express that", file="config.json")
        return n
    if "num_hash_layers" in config:
        return int(config["num_hash_layers"])
    raise ConvertError("neither mlp_layer_types nor num_hash_layers: cannot derive num_hash_layers", file="config.json")


def release_rope(config: dict[str, Any]) -> dict[str, Any] | None:
    """The source's nested RoPE as DeepSeek's flat release dict; None where it is flat already or has no such form
    (then it is written as it is, which vLLM >= 0.32 reads)."""
    rp = config.get("rope_parameters")
    if not (isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)):
        return None
    main, comp = rp["main"], rp["compress"]
    ctype = comp.get("rope_type", comp.get("type", "default"))
    prf = config.get("partial_rotary_factor")
    if (
        main.get("rope_type", main.get("type", "default")) != "default"
        or "rope_theta" not in config
        or "compress_rope_theta" not in config
        or main.get("rope_theta", config["rope_theta"]) != config["rope_theta"]
        or comp.get("rope_theta", config["compress_rope_theta"]) != config["compress_rope_theta"]
        or any(d.get("partial_rotary_factor", prf) != prf for d in (main, comp))
        or comp.get("attention_factor", 1.0) != 1.0
    ):
        return None
    if ctype == "yarn":
        return {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor", "attention_factor")}
    if ctype == "default" and "max_position_embeddings" in config:
        return {
            "rope_type": "yarn",
            "factor": 1.0,
            "original_max_position_embeddings": config["max_position_embeddings"],
            "beta_fast": 32,
            "beta_slow": 1,
        }
    return None


def quantization_config(ignored_layers: list[str]) -> dict[str, Any]:
    """The output's ``quantization_config``: block FP8 (128x128, ue8m0 scales), NVFP4 routed experts, and the
    modules vLLM must build unquantized; ``verify`` checks a checkpoint against it."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
        "moe_quant_algo": "NVFP4",
        "ignored_layers": list(ignored_layers),
    }


def vllm_config(source: dict[str, Any], ignored_layers: list[str]) -> dict[str, Any]:
    """The output config.json for stock vLLM (0.22 .. 0.33)."""
    if source.get("model_type") != "deepseek_v4":
        raise ConvertError(f"model_type {source.get('model_type')!r} is not deepseek_v4", file="config.json")
    config = {k: v for k, v in source.items() if k not in ("mlp_layer_types", "quantization_config")}
    config["compress_ratios"] = compress_ratios(source)
    config["num_hash_layers"] = num_hash_layers(source)
    rope = release_rope(source)
    if rope is not None:
        config["rope_parameters"] = rope
    config["topk_method"] = "noaux_tc"
    config["expert_dtype"] = "fp4"
    config["quantization_config"] = quantization_config(ignored_layers)
    return config


def hf_quant_config(expert_modules: list[str], ignored_layers: list[str]) -> dict[str, Any]:
    """hf_quant_config.json in the form ModelOpt's DeepSeek-V4 exporter writes it."""
    return {
        "producer": {"name": "nvfp4-convert", "version": __version__},
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "quantized_layers": {m: {"quant_algo": "NVFP4", "group_size": 16} for m in expert_modules},
            "exclude_modules": list(ignored_layers),
        },
    }
