"""What ``config.json`` implies: every tensor a DeepSeek-V4 of that config has, with its logical shape.

``expected_shapes(config)`` gives, in transformers' names, the shape of every tensor of the decoder (embedding,
head, norms, hyper-connections, per layer attention / compressor / indexer / router / shared and routed experts,
routed experts one module per expert as ModelOpt exports them); linears as ``[out, in]`` whatever their storage
format. It is the rule transformers' ``DeepseekV4ForCausalLM`` builds its parameters by (tested against its
meta-device model). MTP layers (``mtp.*``) are not covered: transformers has none. ``expected_mtp_shapes(config, j)``
gives, in native names, MTP block ``j`` as DeepSeek's release and vLLM's ``DeepSeekV4MTP`` hold it: one decoder layer
with sliding attention (no compressor, no indexer) and score-routed MoE (a gate bias, no ``tid2eid``), plus its own
``enorm``, ``hnorm``, ``e_proj``, ``h_proj``, ``norm`` and ``hc_head_*``.

``check(inventory, config)`` holds the source against it before anything is written: a tensor of the wrong
shape, one config.json does not imply (a layer or expert too many), or one missing (a layer or expert too few)
stops the run naming the tensor and the config keys behind the shape.
"""

from __future__ import annotations

from typing import Any

from .config_emit import COMPRESS_RATIO
from .errors import ConvertError
from .inventory import Inventory, Module
from .naming import native_name

_TYPE_OF_RATIO = {ratio: t for t, ratio in COMPRESS_RATIO.items()}
_CSA, _HCA = "compressed_sparse_attention", "heavily_compressed_attention"


def _layer_types(c: dict[str, Any]) -> list[str]:
    if "layer_types" in c:
        return list(c["layer_types"])
    if "compress_ratios" in c:
        try:
            return [_TYPE_OF_RATIO[int(r)] for r in c["compress_ratios"][: c["num_hidden_layers"]]]
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"compress_ratios {c['compress_ratios']!r}: unknown ratio", file="config.json") from e
    raise ConvertError("neither layer_types nor compress_ratios: cannot derive compress_ratios", file="config.json")


def _hash_layers(c: dict[str, Any]) -> int:
    if "mlp_layer_types" in c:
        return sum(1 for t in c["mlp_layer_types"] if t == "hash_moe")
    return int(c.get("num_hash_layers", 0))


def _compress_rate(c: dict[str, Any], layer_type: str) -> int:
    rates = c.get("compress_rates") or {}
    return int(rates.get(layer_type, COMPRESS_RATIO[layer_type]))


def expected_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Transformers name -> logical shape of every tensor of a DeepSeek-V4 with config ``c`` (no MTP)."""
    try:
        h, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
        heads, hd, q_lora = int(c["num_attention_heads"]), int(c["head_dim"]), int(c["q_lora_rank"])
        groups, o_lora = int(c["o_groups"]), int(c["o_lora_rank"])
        ih, ihd = int(c["index_n_heads"]), int(c["index_head_dim"])
        experts, inter = int(c["n_routed_experts"]), int(c["moe_intermediate_size"])
        top_k, vocab, hc = int(c["num_experts_per_tok"]), int(c["vocab_size"]), int(c.get("hc_mult", 4))
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"cannot read the model's dimensions: {e!r}", file="config.json") from e
    types, n_hash = _layer_types(c), _hash_layers(c)
    if len(types) < n:
        raise ConvertError(f"{len(types)} layer types for {n} layers", file="config.json")
    mix = (2 + hc) * hc
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "model.norm.weight": (h,),
        "model.hc_head.hc_fn": (hc, hc * h),
        "model.hc_head.hc_base": (hc,),
        "model.hc_head.hc_scale": (1,),
    }
    for i in range(n):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        out |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            **{f"{p}.{hcm}.fn": (mix, hc * h) for hcm in ("attn_hc", "ffn_hc")},
            **{f"{p}.{hcm}.base": (mix,) for hcm in ("attn_hc", "ffn_hc")},
            **{f"{p}.{hcm}.scale": (3,) for hcm in ("attn_hc", "ffn_hc")},
            f"{a}.sinks": (heads,),
            f"{a}.q_a_proj.weight": (q_lora, h),
            f"{a}.q_a_norm.weight": (q_lora,),
            f"{a}.q_b_proj.weight": (heads * hd, q_lora),
            f"{a}.kv_proj.weight": (hd, h),
            f"{a}.kv_norm.weight": (hd,),
            f"{a}.o_a_proj.weight": (groups * o_lora, heads * hd // groups),
            f"{a}.o_b_proj.weight": (h, groups * o_lora),
        }
        if types[i] in (_CSA, _HCA):
            ratio = _compress_rate(c, types[i])
            width = 2 * hd if types[i] == _CSA else hd  # CSA windows overlap: two entries per position
            cp = f"{a}.compressor"
            out |= {
                f"{cp}.kv_proj.weight": (width, h),
                f"{cp}.gate_proj.weight": (width, h),
                f"{cp}.position_bias": (ratio, width),
                f"{cp}.kv_norm.weight": (hd,),
            }
            if types[i] == _CSA:
                ix = f"{cp}.indexer"
                out |= {
                    f"{ix}.kv_proj.weight": (2 * ihd, h),
                    f"{ix}.gate_proj.weight": (2 * ihd, h),
                    f"{ix}.position_bias": (ratio, 2 * ihd),
                    f"{ix}.kv_norm.weight": (ihd,),
                    f"{ix}.q_b_proj.weight": (ih * ihd, q_lora),
                    f"{ix}.scorer.weights_proj.weight": (ih, h),
                }
        m = f"{p}.mlp"
        out[f"{m}.gate.weight"] = (experts, h)
        if i < n_hash:
            out[f"{m}.gate.tid2eid"] = (vocab, top_k)
        else:
            out[f"{m}.gate.e_score_correction_bias"] = (experts,)
        for mod, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out[f"{m}.shared_experts.{mod}.weight"] = shape
            for e in range(experts):
                out[f"{m}.experts.{e}.{mod}.weight"] = shape
    return out


def expected_mtp_shapes(c: dict[str, Any], index: int = 0) -> dict[str, tuple[int, ...]]:
    """Native name -> logical shape (linears as ``<module>.weight`` [out, in]) of MTP block ``index`` of config ``c``."""
    one = {**c, "num_hidden_layers": 1, "layer_types": ["sliding_attention"], "mlp_layer_types": ["moe"]}
    p = f"mtp.{index}."
    out: dict[str, tuple[int, ...]] = {}
    for tf_name, shape in expected_shapes(one).items():
        if tf_name.startswith("model.layers.0."):
            native = native_name(tf_name, "transformers")
            assert native is not None, tf_name
            out[p + native.removeprefix("layers.0.")] = shape
    h, hc = int(c["hidden_size"]), int(c.get("hc_mult", 4))
    out |= {f"{p}{n}.weight": (h,) for n in ("enorm", "hnorm", "norm")}
    out |= {f"{p}{n}.weight": (h, h) for n in ("e_proj", "h_proj")}
    out |= {f"{p}hc_head_fn": (hc, hc * h), f"{p}hc_head_base": (hc,), f"{p}hc_head_scale": (1,)}
    return out


def _logical_shape(m: Module) -> tuple[int, ...]:
    return tuple(m.shape) if m.format != "tensor" else tuple(m.params[""].shape)


def _counts_match(inv: Inventory, config: dict[str, Any]) -> None:
    """Layer and expert counts first: cheap, and they bound what ``expected_shapes`` builds (a hostile config)."""
    layers = {m.layer for m in inv.modules.values() if m.layer is not None and not m.name.startswith("mtp.")}
    experts = {int(e) for ids in inv.experts().values() for e in ids}
    for key, have, what in (
        ("num_hidden_layers", 1 + max(layers, default=-1), "layers"),
        ("n_routed_experts", 1 + max(experts, default=-1), "routed experts"),
    ):
        value = config.get(key)
        if type(value) is not int or value < 0:
            raise ConvertError(f"{key} is {value!r}, not a count", file="config.json")
        if value != have:
            raise ConvertError(f"{key} is {value}, the source has {have} {what}", file="config.json")


def check(inv: Inventory, config: dict[str, Any]) -> None:
    """Refuse, naming the tensor, a source whose tensors are not those ``config`` implies (MTP not checked)."""
    _counts_match(inv, config)
    try:
        expected = expected_shapes(config)
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a config value of the wrong type
        raise ConvertError(f"cannot derive the model's tensors: {type(e).__name__}: {e}", file="config.json") from None
    want: dict[str, tuple[int, ...]] = {}
    source_name: dict[str, str] = {}
    for tf_name, shape in expected.items():
        native = native_name(tf_name, "transformers")
        assert native is not None, tf_name  # every rule above has a native name (tested)
        key = native.removesuffix(".weight") if native.removesuffix(".weight") in inv.modules else native
        want[key] = shape
        source_name[key] = tf_name
    dims = (
        "hidden_size, num_attention_heads, head_dim, *_rank, o_groups, index_*, n_routed_experts, moe_intermediate_size"
    )
    for name, m in inv.modules.items():
        if name.startswith("mtp."):
            continue
        t = next(iter(m.params.values()))
        if name not in want:
            raise ConvertError(
                "not a tensor config.json implies (num_hidden_layers, n_routed_experts, layer types)",
                file=t.file,
                tensor=t.name,
            )
        if _logical_shape(m) != want[name]:
            raise ConvertError(
                f"shape {list(_logical_shape(m))} but config.json implies {list(want[name])} ({dims})",
                file=t.file,
                tensor=t.name,
            )
    missing = [source_name[k] for k in want if k not in inv.modules]
    if missing:
        raise ConvertError(
            f"{len(missing)} tensor(s) config.json implies are not in the source, first {missing[0]}",
            file="config.json",
        )
