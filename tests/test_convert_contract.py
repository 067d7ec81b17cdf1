"""The converted checkpoint, tensor by tensor, against CONTRACT.md section 3 and the oracles.

Runs on both sources (the repo's 3-shard export with NVFP4 and BF16 ``o_a_proj``, and the shared
single-file export) and every policy. Expected formats are restated here from the contract table,
not taken from ``nvfp4_convert.policy``.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GOLDEN, REPO_FIXTURE
from helpers import load_all

from nvfp4_convert.codecs import dequantize_nvfp4
from nvfp4_convert.naming import to_native

# Contract section 3, per policy: output format of each non-expert linear (by native leaf path).
ATTN = ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b")
ALWAYS_BF16 = (
    "attn.compressor.wkv",
    "attn.compressor.wgate",
    "attn.indexer.compressor.wkv",
    "attn.indexer.compressor.wgate",
    "attn.indexer.weights_proj",
)
SHARED = ("ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3")
EXPECTED = {
    "default": {**{a: "bf16" for a in ATTN}, "attn.wo_a": "fp8", **{s: "fp8" for s in SHARED}},
    "fp8": {**{a: "fp8" for a in ATTN}, **{s: "fp8" for s in SHARED}},
    "bf16": {**{a: "bf16" for a in ATTN}, **{s: "bf16" for s in SHARED}},
}
for table in EXPECTED.values():
    table.update({m: "bf16" for m in ALWAYS_BF16})


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _leaf(native_module: str) -> str:
    return native_module.split(".", 2)[2]  # drop "layers.N."


def _source_modules(src: dict[str, torch.Tensor]) -> dict[str, str]:
    """native module -> transformers module, for every linear (a tensor named *.weight with a 2-D shape)."""
    out = {}
    for name, t in src.items():
        if name.endswith(".weight") and t.dim() == 2 and ".layers." in name and ".mlp.gate." not in name:
            native = to_native(name)
            assert native is not None
            out[native.removesuffix(".weight")] = name.removesuffix(".weight")
    return out


def _float32_source(src: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    w = src[f"{module}.weight"]
    if w.dtype == torch.uint8:
        return dequantize_nvfp4(w, src[f"{module}.weight_scale"], src[f"{module}.weight_scale_2"])
    return w.to(torch.float32)


@pytest.mark.parametrize("policy", ["default", "fp8", "bf16"])
def test_every_output_tensor_is_what_the_contract_says(source, convert_once, policy):
    src = load_all(source)
    out = load_all(convert_once(source, policy))
    modules = _source_modules(src)
    expected_names = set()
    for native, tf in modules.items():
        if ".ffn.experts." in native:  # routed experts: NVFP4, bytes untouched, names native
            for p in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
                assert _same_bytes(out[f"{native}.{p}"], src[f"{tf}.{p}"]), f"{native}.{p}"
                expected_names.add(f"{native}.{p}")
            continue
        fmt = EXPECTED[policy][_leaf(native)]
        rows, cols = src[f"{tf}.weight"].shape[0], _float32_source(src, tf).shape[1]
        w = out[f"{native}.weight"]
        expected_names.add(f"{native}.weight")
        assert tuple(w.shape) == (rows, cols), native
        if fmt == "bf16":
            assert w.dtype == torch.bfloat16, native
        else:
            s = out[f"{native}.scale"]
            expected_names.add(f"{native}.scale")
            assert w.dtype == torch.float8_e4m3fn, native
            assert s.dtype == torch.float8_e8m0fnu, native
            assert tuple(s.shape) == (-(-rows // 128), -(-cols // 128)), native
    for name, t in src.items():  # everything else: renamed, dtype and bytes unchanged
        native = to_native(name)
        module = native.rsplit(".", 1)[0]
        if module in modules:
            continue
        assert out[native].dtype == t.dtype, name
        assert _same_bytes(out[native], t), name
        expected_names.add(native)
    assert set(out) == expected_names  # nothing stale, nothing missing


def test_bf16_outputs_equal_modelopt_dequantization_rounded_to_bf16(convert_once):
    if not GOLDEN.exists():
        pytest.skip("golden values not present")
    golden = load_all(GOLDEN.parent)
    for policy in ("default", "bf16"):
        out = load_all(convert_once(REPO_FIXTURE, policy, "bf16"))
        checked = 0
        for tf_module, ref in golden.items():
            native = to_native(f"{tf_module}.weight")
            got = out[native]
            if got.dtype != torch.bfloat16:
                continue
            expected = ref.to(torch.bfloat16)
            same = got.view(torch.int16) == expected.view(torch.int16)
            both_zero = (got == 0) & (expected == 0)  # the sign of a zero aside
            assert bool((same | both_zero).all()), native
            checked += 1
        assert checked >= 40


vllm_deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")


@pytest.mark.parametrize("policy", ["default", "fp8"])
def test_fp8_outputs_equal_vllm_ue8m0_block_quantizer(source, convert_once, policy):
    src = load_all(source)
    out = load_all(convert_once(source, policy))
    checked = 0
    for native, tf in _source_modules(src).items():
        if f"{native}.scale" not in out:
            continue
        x = _float32_source(src, tf)  # float32 source values, never a BF16 intermediate
        ref_q, ref_s = vllm_deep_gemm.per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)
        assert torch.equal(out[f"{native}.weight"].view(torch.uint8), ref_q.view(torch.uint8)), native
        scale = out[f"{native}.scale"].to(torch.float32)
        assert torch.equal(scale, ref_s.to(torch.float32)), native
        mantissa, _ = torch.frexp(scale)
        assert bool((mantissa == 0.5).all()), native  # exact powers of two
        checked += 1
    assert checked >= 8


def test_both_o_a_proj_formats_are_converted(convert_once):
    """The repo fixture has NVFP4 o_a_proj in layers 0 and 2 and BF16 in 1 and 3: all become FP8 wo_a."""
    src = load_all(REPO_FIXTURE)
    kinds = {src[f"model.layers.{i}.self_attn.o_a_proj.weight"].dtype for i in range(4)}
    assert kinds == {torch.uint8, torch.bfloat16}
    out = load_all(convert_once(REPO_FIXTURE))
    for i in range(4):
        assert out[f"layers.{i}.attn.wo_a.weight"].dtype == torch.float8_e4m3fn
        assert out[f"layers.{i}.attn.wo_a.scale"].dtype == torch.float8_e8m0fnu


def test_report_accounts_for_every_input_tensor(source, convert_once):
    report = json.loads((convert_once(source) / "nvfp4-convert-report.json").read_text())
    src_names = set(load_all(source))
    accounted = [t["source"] for t in report["tensors"]]
    assert sorted(accounted) == sorted(src_names)
    for t in report["tensors"]:
        if t["action"] == "dropped":
            assert t["source"].endswith(".input_scale") and t["reason"]
        else:
            assert t["outputs"], t
    assert report["totals"]["input_tensors"] == len(src_names)
    assert {d["source"] for d in report["dropped"]} == {
        t["source"] for t in report["tensors"] if t["action"] == "dropped"
    }


def test_index_lists_every_tensor_once_with_total_size(source, convert_once):
    dst = convert_once(source)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    out = load_all(dst)
    assert set(index["weight_map"]) == set(out)
    total = sum(t.numel() * t.element_size() for t in out.values())
    assert index["metadata"]["total_size"] == total


def test_auxiliary_files_are_carried_over(source, convert_once):
    dst = convert_once(source)
    assert (dst / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
