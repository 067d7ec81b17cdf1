"""The ModelOpt recipe fixtures under ``tests/fixtures/recipes/`` are what ``tests/fixtures/README.md`` says.

Reads headers and JSON only (``safetensors`` + ``json``); assumes nothing about the converter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

RECIPES = Path(__file__).resolve().parent / "fixtures" / "recipes"
LAYERS = range(4)
EXPERTS = range(4)
ATTN_LINEARS = ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj")
SHARED = ("gate_proj", "up_proj", "down_proj")
# [out, in] of the tiny model's linears (hidden 128, q_lora 64, o_lora 64, moe_intermediate 64)
SHAPES = {
    "self_attn.q_a_proj": (64, 128),
    "self_attn.q_b_proj": (256, 64),
    "self_attn.kv_proj": (64, 128),
    "self_attn.o_a_proj": (128, 128),
    "self_attn.o_b_proj": (128, 128),
    "mlp.shared_experts.gate_proj": (64, 128),
    "mlp.shared_experts.up_proj": (64, 128),
    "mlp.shared_experts.down_proj": (128, 64),
}
EXPERT_SHAPES = {"gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def header(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor: (dtype, shape)}`` of a recipe fixture's single shard."""
    path = RECIPES / name / "model.safetensors"
    out = {}
    with safe_open(str(path), "numpy") as f:
        for key in f.keys():  # noqa: SIM118
            s = f.get_slice(key)
            out[key] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def quant_json(name: str) -> dict:
    return json.loads((RECIPES / name / "hf_quant_config.json").read_text())


def config_json(name: str) -> dict:
    return json.loads((RECIPES / name / "config.json").read_text())


def assert_nvfp4(h: dict, module: str, out_in: tuple[int, int], block: int = 16, input_scale: bool = True) -> None:
    out, inp = out_in
    assert h[f"{module}.weight"] == ("U8", (out, inp // 2)), module
    assert h[f"{module}.weight_scale"] == ("F8_E4M3", (out, inp // block)), module
    assert h[f"{module}.weight_scale_2"] == ("F32", ()), module
    if input_scale:
        assert h[f"{module}.input_scale"] == ("F32", ()), module
    else:
        assert f"{module}.input_scale" not in h, module


def assert_fp8(h: dict, module: str, out_in: tuple[int, int]) -> None:
    assert h[f"{module}.weight"] == ("F8_E4M3", out_in), module
    assert h[f"{module}.weight_scale"] == ("F32", ()), module
    assert h[f"{module}.input_scale"] == ("F32", ()), module
    assert f"{module}.weight_scale_2" not in h, module


def assert_plain(h: dict, module: str, dtype: str, out_in: tuple[int, int]) -> None:
    assert h[f"{module}.weight"] == (dtype, out_in), module
    for suffix in ("weight_scale", "weight_scale_2", "input_scale"):
        assert f"{module}.{suffix}" not in h, module


def suffixes(h: dict) -> set[str]:
    return {k.rsplit(".", 1)[1] for k in h}


ALL = [
    "nvfp4-kv-fp8",
    "experts-nvfp4-attn-fp8",
    "nvfp4-bs32",
    "experts-w4a16",
    "nvfp4-embed-lm-head",
    "nvfp4-fp32",
]


@pytest.mark.parametrize("name", ALL)
def test_files_and_producer(name: str) -> None:
    d = RECIPES / name
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json",
        "generation_config.json",
        "hf_quant_config.json",
        "model.safetensors",
    ]
    q = quant_json(name)
    assert q["producer"] == {"name": "modelopt", "version": "0.45.0"}
    c = config_json(name)["quantization_config"]
    assert c["producer"] == q["producer"] and c["quant_method"] == "modelopt"
    assert c["quant_algo"] == q["quantization"]["quant_algo"]
    assert (d / "model.safetensors").stat().st_size < 2_000_000


def test_kv_fp8() -> None:
    h = header("nvfp4-kv-fp8")
    q = quant_json("nvfp4-kv-fp8")["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["kv_cache_quant_algo"] == "FP8" and q["group_size"] == 16
    assert config_json("nvfp4-kv-fp8")["quantization_config"]["kv_cache_scheme"] == {
        "dynamic": False,
        "num_bits": 8,
        "type": "float",
    }
    kv = sorted(k for k in h if k.endswith(("k_scale", "v_scale")))
    assert kv == sorted(f"model.layers.{i}.self_attn.{p}_proj.{p}_scale" for i in LAYERS for p in "kv")
    assert all(h[k] == ("F32", ()) for k in kv)
    # the k_proj / v_proj modules these name do not exist in the model: only their scales
    assert not [k for k in h if re.search(r"self_attn\.[kv]_proj\.(weight|input_scale)", k)]
    for i in LAYERS:
        for m, shape in SHAPES.items():
            assert_nvfp4(h, f"model.layers.{i}.{m}", shape)


def test_experts_nvfp4_attn_fp8() -> None:
    name = "experts-nvfp4-attn-fp8"
    h = header(name)
    q = quant_json(name)["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and q["kv_cache_quant_algo"] is None
    assert "exclude_modules" not in q and "group_size" not in q
    layers = q["quantized_layers"]
    for i in LAYERS:
        for p in ATTN_LINEARS:
            m = f"model.layers.{i}.self_attn.{p}"
            assert layers[m] == {"quant_algo": "FP8"}
            assert_fp8(h, m, SHAPES[f"self_attn.{p}"])
        assert layers[f"model.layers.{i}.mlp.experts"] == {"quant_algo": "NVFP4", "group_size": 16}
        for e in EXPERTS:
            for p, shape in EXPERT_SHAPES.items():
                assert_nvfp4(h, f"model.layers.{i}.mlp.experts.{e}.{p}", shape)
        for p in SHARED:
            assert_plain(h, f"model.layers.{i}.mlp.shared_experts.{p}", "BF16", SHAPES[f"mlp.shared_experts.{p}"])
    # compressor / indexer linears are FP8 too
    assert_fp8(h, "model.layers.2.self_attn.compressor.indexer.q_b_proj", (128, 64))
    assert set(v["quant_algo"] for v in layers.values()) == {"FP8", "NVFP4"}
    assert not [k for k in h if k.startswith("model.layers.") and ".shared_experts." in k and "scale" in k]
    assert config_json(name)["quantization_config"]["ignore"] == []


def test_bs32() -> None:
    h = header("nvfp4-bs32")
    q = quant_json("nvfp4-bs32")["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION"
    layers = q["quantized_layers"]
    for i in LAYERS:
        for m, shape in SHAPES.items():
            assert_nvfp4(h, f"model.layers.{i}.{m}", shape, block=32)
            assert layers[f"model.layers.{i}.{m}"] == {"quant_algo": "NVFP4", "group_size": 32}
        assert layers[f"model.layers.{i}.mlp.experts"] == {"quant_algo": "NVFP4", "group_size": 16}
        for e in EXPERTS:
            for p, shape in EXPERT_SHAPES.items():
                assert_nvfp4(h, f"model.layers.{i}.mlp.experts.{e}.{p}", shape, block=16)
    groups = config_json("nvfp4-bs32")["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["group_size"] for g in groups.values()) == [16, 32]


def test_experts_w4a16() -> None:
    h = header("experts-w4a16")
    q = quant_json("experts-w4a16")["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION"
    layers = q["quantized_layers"]
    for i in LAYERS:
        assert layers[f"model.layers.{i}.mlp.experts"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}
        for e in EXPERTS:
            for p, shape in EXPERT_SHAPES.items():
                assert_nvfp4(h, f"model.layers.{i}.mlp.experts.{e}.{p}", shape, input_scale=False)
        for m, shape in SHAPES.items():
            assert_nvfp4(h, f"model.layers.{i}.{m}", shape)
            assert layers[f"model.layers.{i}.{m}"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert not [k for k in h if ".mlp.experts." in k and k.endswith("input_scale")]


def test_embed_lm_head() -> None:
    name = "nvfp4-embed-lm-head"
    h = header(name)
    q = quant_json(name)["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION"
    layers = q["quantized_layers"]
    assert layers["model.embed_tokens"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}
    assert layers["lm_head"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert_nvfp4(h, "model.embed_tokens", (256, 128), input_scale=False)
    assert_nvfp4(h, "lm_head", (256, 128))
    for i in LAYERS:
        assert_plain(h, f"model.layers.{i}.mlp.gate", "BF16", (4, 128))
    # as ModelOpt wrote it: config.json says float32 although the plain tensors are BF16
    assert config_json(name)["dtype"] == "float32"
    assert h["model.layers.0.mlp.gate.weight"][0] == "BF16"


def test_fp32() -> None:
    h = header("nvfp4-fp32")
    q = quant_json("nvfp4-fp32")["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16
    assert config_json("nvfp4-fp32")["dtype"] == "float32"
    assert_plain(h, "model.embed_tokens", "F32", (256, 128))
    assert_plain(h, "lm_head", "F32", (256, 128))
    for i in LAYERS:
        assert_plain(h, f"model.layers.{i}.mlp.gate", "F32", (4, 128))
        for m, shape in SHAPES.items():
            assert_nvfp4(h, f"model.layers.{i}.{m}", shape)
    assert "BF16" not in {d for d, _ in h.values()}
    assert {d for d, _ in h.values()} == {"F32", "U8", "F8_E4M3", "I64"}


@pytest.mark.parametrize("name", ALL)
def test_only_expected_suffixes(name: str) -> None:
    allowed = {"weight", "weight_scale", "weight_scale_2", "input_scale", "bias"}
    allowed |= {"k_scale", "v_scale"} if name == "nvfp4-kv-fp8" else set()
    plain = {
        "tid2eid",
        "sinks",
        "position_bias",
        "e_score_correction_bias",
        "base",
        "scale",
        "fn",
        "hc_base",
        "hc_scale",
        "hc_fn",
        "ape",
    }
    extra = suffixes(header(name)) - allowed - plain
    assert not extra, extra
